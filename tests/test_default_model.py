"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against Hugging Face transformers on the same file.

transformers dequantizes the GGUF to float32 itself (its own converter and Llama implementation), so
this checks llamaforge's GGUF reader, q/k layout, tokenizer and forward pass together.
Tolerances: logits within 1e-3 absolute (values reach ~30; float32 summation order differs), greedy
continuations identical token for token.
"""

import pytest
import torch

PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
]


@pytest.fixture(scope="module")
def hf_reference(default_gguf):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    return model, tokenizer


def test_tokenizer_matches_transformers(default_llama, hf_reference):
    _, hf_tok = hf_reference
    for text in PROMPTS + ["  spaces   and\ttabs\n\nnewlines", "émojis 🤖🎉 and 日本語", "12345 + 678 = 13023"]:
        assert default_llama.tokenizer.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"], text


def test_logits_match_transformers(default_llama, hf_reference):
    hf_model, _ = hf_reference
    for text in PROMPTS:
        ids = torch.tensor([default_llama.tokenizer.encode(text)])
        with torch.no_grad():
            ref = hf_model(ids).logits[0]
            ours = default_llama.model(ids)[0]
        torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)


def test_greedy_continuation_matches_transformers(default_llama, hf_reference):
    hf_model, _ = hf_reference
    prompt_tokens = [default_llama.tokenizer.encode(t) for t in PROMPTS]
    ours, _ = default_llama.generate(prompt_tokens, 16, temperature=0, stop_ids=())
    for ids, got in zip(prompt_tokens, ours):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)
        assert got == ref[0, len(ids):].tolist()


def test_chat_stops_at_end_of_turn_and_streams_the_same_text(default_llama):
    dialog = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    out = default_llama.chat_completion([dialog], temperature=0, max_gen_len=48, logprobs=True)[0]
    content = out["generation"]["content"]
    assert "Paris" in content
    assert len(out["tokens"]) < 48  # stopped at <|im_end|>, not at the length limit
    assert "<|im_end|>" not in content
    assert "".join(default_llama.stream_chat_completion(dialog, 48, temperature=0)) == content


def test_text_completion_and_streaming_agree(default_llama):
    whole = default_llama.text_completion(["The three primary colors are"], temperature=0, max_gen_len=24)[0]
    pieces = list(default_llama.stream_text_completion("The three primary colors are", 24, temperature=0))
    assert "".join(pieces) == whole["generation"]
    assert len(pieces) > 1
