"""Request and response bodies of the OpenAI-compatible API, as pydantic models (no torch here).

Requests are validated strictly (a string is not a number, `true` is not an integer), each field with
OpenAI's range, so a bad body becomes a 400 naming the field (see `server/errors.py`). Unknown fields
are ignored, as clients often send extras (`user`, `metadata`, `store`). Fields OpenAI has and we do
not implement either have a documented meaning here or are rejected with a 400 that says so, and so are
vLLM's extensions that would change the answer (`UNSERVED_EXTENSIONS`, `guided_*` but `guided_json`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_N = 16


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


# vLLM's sampling extensions this server does not implement, with the value that changes nothing: any other
# value is a 400 (prepare.py); unknown fields otherwise stay ignored
UNSERVED_EXTENSIONS: Dict[str, Any] = {
    "min_tokens": 0, "ignore_eos": False, "include_stop_str_in_output": False, "use_beam_search": False,
    "length_penalty": 1.0, "stop_token_ids": None, "truncate_prompt_tokens": None, "prompt_logprobs": None,
    "skip_special_tokens": True, "add_generation_prompt": True, "continue_final_message": False, "echo": False,
}


class SamplingFields(_Strict):
    """The sampling parameters both generation endpoints share (unknown fields kept in `model_extra`, to
    refuse the `UNSERVED_EXTENSIONS`)."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 is greedy; default 0.6 (Meta's, as the CLI and the chat page)")
    top_p: Optional[float] = Field(None, ge=0, le=1, description="nucleus threshold with Meta's semantics (0: greedy)")
    top_k: Optional[int] = Field(None, ge=-1, description="keep the k most likely tokens; 0 or -1: all")
    min_p: Optional[float] = Field(None, ge=0, le=1, description="drop tokens below min_p * p(best)")
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10, description="CTRL/HF-style, over prompt and output")
    logit_bias: Optional[Dict[str, float]] = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    n: int = Field(1, ge=1, le=MAX_N, description="number of choices")
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    user: Optional[str] = None
    # vLLM's structured-output extensions: guided_json is served (as a json_schema response_format); the
    # others are a 400 (prepare.py), not an unconstrained answer
    guided_json: Optional[Union[Dict[str, Any], str]] = None
    guided_regex: Optional[Any] = None
    guided_choice: Optional[Any] = None
    guided_grammar: Optional[Any] = None
    structured_outputs: Optional[Any] = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: Union[str, List[str], List[int], List[List[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url", "input_audio", "file"]


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, List[Union[TextPart, ImagePart]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[List[ToolCall]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None  # an earlier answer's thoughts, for templates that render them (Qwen3)


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(_Strict):
    name: str = "response"
    description: Optional[str] = None
    schema_: Optional[Dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaSpec] = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[List[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None  # false: at most one tool call per answer
    # vLLM's extension: extra variables for the model's chat template (Qwen3's enable_thinking)
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    # llama.cpp server's: "auto" / "deepseek" (default) put a thinking model's thoughts in reasoning_content,
    # "none" leaves them in the content
    reasoning_format: Optional[Literal["auto", "deepseek", "none"]] = None
    # refused with a 400 when given (prepare.py): results would silently differ from what was asked
    functions: Optional[List[Any]] = None
    function_call: Optional[Any] = None
    modalities: Optional[List[str]] = None
    audio: Optional[Dict[str, Any]] = None


class EmbeddingRequest(_Strict):
    """POST /v1/embeddings: mean-pooled final hidden states, L2-normalised."""

    input: Union[str, List[str], List[int], List[List[int]]]
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None


class TokenizeRequest(_Strict):
    """POST /tokenize (vLLM's extension): a prompt, or chat messages rendered with the chat format."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[List[ChatMessage]] = None
    add_special_tokens: bool = True


# -- responses (plain dicts are built in handlers; these document the shapes for the OpenAPI spec) --


class LoadLoraRequest(_Strict):
    """vLLM's POST /v1/load_lora_adapter: serve the PEFT folder at `lora_path` as model `lora_name`."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraRequest(_Strict):
    lora_name: str = Field(min_length=1, max_length=256)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llamaforge"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]
