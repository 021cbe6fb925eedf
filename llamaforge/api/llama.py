"""`Llama`: Meta's public API (build, generate, text_completion, chat_completion) on any machine.

The class a user holds: a built model, its tokenizer and chat format, Meta's generate family and the
streaming forms, each a thin layer over `dispatch.py` (how a call becomes work on the engine) and
`engines.py` (the engine it runs on, which `Llama` inherits as `EngineHost`). `Llama.build` is `build.py`'s.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Iterator, List, Mapping, Optional, Sequence, TypedDict, Union

import torch

from llamaforge import runtime
from llamaforge.api import dispatch
from llamaforge.api.build import build as _build_llama
from llamaforge.api.engines import EngineHost
from llamaforge.chat import ChatFormat, Dialog, Message, chat_format_for, has_special_tags
from llamaforge.errors import ConfigError, GenerationError
from llamaforge.generation.calls import stream_job
from llamaforge.generation.checks import check_texts
from llamaforge.model import ModelArgs, Transformer
from llamaforge.tokenizer import Tokenizer

UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


class CompletionPrediction(TypedDict, total=False):
    generation: str  # not required
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class Llama(EngineHost):
    """A loaded model + tokenizer, with Meta's generation API."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_seq_len: int,
        max_batch_size: int,
        device: torch.device,
        checkpoint_format: str = "unknown",
        source: Optional[Path] = None,
        decode_step: Optional[runtime.DecodeStep] = None,
        rank: int = 0,
        world: int = 1,
        chat_format: Optional[ChatFormat] = None,
    ):
        """Wrap a built model and its tokenizer; `decode_step` is the one-token step generation calls
        (default: the model's modules; `Llama.build` passes the one `llamaforge.runtime.prepare` chose);
        `rank`, `world`: this process's place in a tensor-parallel launch (the model is its slice);
        `chat_format`: the tokenizer's (`chat_format_for(tokenizer)`, made here when not given)."""
        if decode_step is not None and decode_step.model is not model:
            raise ConfigError("decode_step must be a DecodeStep of this model (its .model is another one)")
        self.model = model
        self.decode_step = decode_step if decode_step is not None else runtime.DecodeStep(model)
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.device = device
        self.checkpoint_format = checkpoint_format
        self.source = source
        self.chat_format = chat_format if chat_format is not None else chat_format_for(tokenizer)
        self.rank, self.world = rank, world
        self._init_engines()

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @property
    def kv_type(self) -> str:
        """The KV cache's element type: "float32", "float16", "bfloat16" or "q8_0" (Llama.build's `kv_type`)."""
        return self.decode_step.kv_type

    @property
    def weight_type(self) -> str:
        """How most of the model's matrices are stored: a GGUF quant name ("Q4_K", "Q8_0", ...) or F32 / F16 / BF16."""
        counts: collections.Counter = collections.Counter()
        for module in self.model.modules():
            qtype, weight = getattr(module, "qtype", None), getattr(module, "weight", None)
            if isinstance(qtype, str):
                counts[qtype] += 1
            elif isinstance(weight, torch.Tensor) and weight.dim() == 2:
                counts[{torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(
                    weight.dtype, str(weight.dtype))] += 1
        return counts.most_common(1)[0][0] if counts else "unknown"

    build = classmethod(_build_llama)  # Llama.build(ckpt_dir, tokenizer_path, ...): see api/build.py

    # -- generation on token ids ------------------------------------------------------------------

    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: Optional[int] = None,
        seed: Optional[int] = None,
        stop_ids: Optional[Sequence[int]] = None,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: Optional[Mapping[int, float]] = None,
        stop: Union[None, str, Sequence[str]] = None,
        n: int = 1,
        response_format: Optional[Mapping[str, Any]] = None,
        speculative: Union[None, str, "Llama"] = None,
    ) -> tuple[List[List[int]], Optional[List[List[float]]]]:
        """Meta's `generate`: continue token-id prompts.

        Args:
            prompt_tokens: one list of token ids per prompt (at most max_batch_size prompts).
            max_gen_len: most tokens to generate per prompt.
            temperature: 0 for greedy; otherwise softmax temperature.
            top_p: nucleus sampling threshold in [0, 1] (Meta's: the token that crosses it stays; 0 is greedy).
            logprobs: also return log p(token | prefix) per returned token.
            echo: include the prompt tokens (and their logprobs) in the output.
            top_k: keep only the k most likely tokens before sampling (None: all).
            seed: seed a private generator (prompt i, choice j: seed + i * n + j); None: torch's global one.
            stop_ids: ids that end a row (default: the tokenizer's stop ids).
            min_p: drop tokens less likely than min_p * p(most likely).
            repetition_penalty: CTRL's, over the prompt and the output (1: off).
            frequency_penalty, presence_penalty: OpenAI's, over the output, in [-2, 2].
            logit_bias: token id -> bias in [-100, 100] added to its logit.
            stop: strings that end a row (the text stops before them; the token that completes one is kept).
            n: choices per prompt; the result has len(prompt_tokens) * n rows, prompt by prompt.
            response_format: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}:
                the output is constrained to JSON (llguidance).
            speculative: greedy speculative decoding, with output token for token that of plain greedy
                decoding: "ngram" (prompt lookup: drafts what followed the latest earlier occurrence of the
                last tokens; pays off on answers that copy from the prompt) or a smaller `Llama` with the same
                vocabulary as the draft model. Needs temperature=0 and none of logprobs, n, stop, penalties,
                logit_bias or response_format; prompts run one after another (see generation/speculative.py).

        Returns:
            (tokens per row, logprobs per row or None), each cut before the first stop id.
        """
        params = dispatch.sampling(temperature, top_p, top_k, min_p, repetition_penalty, frequency_penalty,
                                   presence_penalty, logit_bias)
        tokens, lps, _ = dispatch.generate_rows(self, prompt_tokens, max_gen_len, params, logprobs=logprobs,
                                                echo=echo, seed=seed, stop_ids=stop_ids, stop=stop, n=n,
                                                response_format=response_format, speculative=speculative)
        return tokens, lps

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: Optional[int] = None,
        seed: Optional[int] = None,
        **options: Any,
    ) -> List[CompletionPrediction]:
        """Meta's `text_completion`: complete text prompts.

        `max_gen_len=None` means max_seq_len - 1. Prompts get the BOS token the model expects
        (always for Llama 1/2/3) and no EOS. Returns `[{"generation": str}]`, plus "tokens" (each
        token decoded on its own) and "logprobs" when `logprobs` is set. `options` are `generate`'s
        keyword arguments (min_p, penalties, logit_bias, stop, n, response_format, stop_ids); with
        `n`, the predictions of each prompt follow each other.
        """
        prompts = check_texts(prompts)
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(p, bos=self.tokenizer.add_bos, eos=False) for p in prompts]
        params = dispatch.sampling(temperature, top_p, top_k, **dispatch.take_sampling_options(options))
        tokens, lps, texts = dispatch.generate_rows(self, prompt_tokens, max_gen_len, params, logprobs=logprobs,
                                                    echo=echo, seed=seed, **options)
        results: List[CompletionPrediction] = []
        n = len(tokens) // max(1, len(prompts))  # choices per prompt
        for i, toks in enumerate(tokens):
            text = self.tokenizer.decode(toks)
            if texts is not None and options.get("stop"):  # cut before the stop string, as streamed
                text = (prompts[i // n] if echo else "") + texts[i]
            results.append(self._with_tokens({"generation": text}, toks, lps[i] if logprobs else None))
        return results

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        *,
        top_k: Optional[int] = None,
        seed: Optional[int] = None,
        **options: Any,
    ) -> List[ChatPrediction]:
        """Meta's `chat_completion`: answer dialogs in the model's own chat format.

        The format is the model's Jinja chat_template when it has one, else Llama 3's header tokens or
        Llama 2's [INST] format. Generation stops at the token that ends a turn in that format.
        With the Llama 2 format, a dialog containing [INST], [/INST], <<SYS>> or <</SYS>> gets Meta's
        error string as its content. `options` are `generate`'s keyword arguments (as `text_completion`).
        """
        if dialogs is None or isinstance(dialogs, (str, Mapping)) or not isinstance(dialogs, Sequence):
            raise GenerationError(f"dialogs must be a list of dialogs (lists of messages), got {type(dialogs).__name__}")
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        prompt_tokens = [self.chat_format.encode_dialog(d) for d in dialogs]
        unsafe = [self.chat_format.name == "llama2" and has_special_tags(d) for d in dialogs]
        options.setdefault("stop_ids", self.chat_format.stop_ids)
        params = dispatch.sampling(temperature, top_p, top_k, **dispatch.take_sampling_options(options))
        tokens, lps, texts = dispatch.generate_rows(self, prompt_tokens, max_gen_len, params, logprobs=logprobs,
                                                    seed=seed, **options)
        results: List[ChatPrediction] = []
        n = len(tokens) // max(1, len(dialogs))  # choices per dialog
        for i, toks in enumerate(tokens):
            content = self.tokenizer.decode(toks) if texts is None or not options.get("stop") else texts[i]
            message: Message = {"role": "assistant", "content": UNSAFE_ERROR if unsafe[i // n] else content}
            results.append(self._with_tokens({"generation": message}, toks, lps[i] if logprobs else None))
        return results

    # -- streaming --------------------------------------------------------------------------------

    def stream_tokens(
        self,
        prompt_tokens: List[int],
        max_gen_len: Optional[int] = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        *,
        top_k: Optional[int] = None,
        seed: Optional[int] = None,
        **options: Any,
    ) -> Iterator[int]:
        """Yield generated token ids for one prompt as they are chosen (stop ids are not yielded).

        The tokens equal `generate([prompt_tokens], ...)[0][0]` for the same settings and seed.
        """
        job = dispatch.make_stream_job(self, prompt_tokens, max_gen_len, temperature, top_p, top_k, seed, options,
                                       text=False)
        for delta in stream_job(self.engine, job):
            for info in delta.tokens:
                yield info.id

    def stream_text_completion(self, prompt: str, max_gen_len: Optional[int] = None, temperature: float = 0.6,
                               top_p: float = 0.9, **options: Any) -> Iterator[str]:
        """Yield the completion of one text prompt piece by piece, never splitting a character
        (nor showing any part of a `stop` string)."""
        if not isinstance(prompt, str):
            raise GenerationError(f"prompt must be a string, got {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos, eos=False)
        yield from self._stream_text(ids, max_gen_len, temperature, top_p, options)

    def stream_chat_completion(self, dialog: Dialog, max_gen_len: Optional[int] = None, temperature: float = 0.6,
                               top_p: float = 0.9, **options: Any) -> Iterator[str]:
        """Yield the assistant's answer to one dialog piece by piece."""
        ids = self.chat_format.encode_dialog(dialog)  # checks the dialog first, as chat_completion does
        if self.chat_format.name == "llama2" and has_special_tags(dialog):
            yield UNSAFE_ERROR
            return
        options.setdefault("stop_ids", self.chat_format.stop_ids)
        yield from self._stream_text(ids, max_gen_len, temperature, top_p, options)

    def _stream_text(self, ids: List[int], max_gen_len, temperature, top_p, options: dict) -> Iterator[str]:
        top_k, seed = options.pop("top_k", None), options.pop("seed", None)
        job = dispatch.make_stream_job(self, ids, max_gen_len, temperature, top_p, top_k, seed, options,
                                       text=True)
        for delta in stream_job(self.engine, job):
            if delta.text:
                yield delta.text

    # -- helpers ----------------------------------------------------------------------------------

    def _with_tokens(self, item: dict, tokens: List[int], logprobs: Optional[List[float]]) -> dict:
        """Meta's "tokens" (each decoded on its own) and "logprobs" fields, when logprobs were asked for."""
        if logprobs is not None:
            item["tokens"] = [self.tokenizer.decode([t]) for t in tokens]
            item["logprobs"] = logprobs
        return item

