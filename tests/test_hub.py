"""Model references without a network: parsing, which files a listing gives, and what is not a reference."""

from __future__ import annotations

import pytest

from llamaforge.errors import CheckpointNotFoundError
from llamaforge.hub import ALIASES, ModelRef, parse_ref, resolve_model
from llamaforge.hub.select import RepoFile, gguf_models, hf_files, plan


@pytest.mark.parametrize("text, expected", [
    ("org/name", ModelRef("org/name")),
    ("org/name:q8_0", ModelRef("org/name", "Q8_0")),
    ("org/name:Q4_K_M@v1.0", ModelRef("org/name", "Q4_K_M", "v1.0")),
    ("org/name@refs/pr/1", ModelRef("org/name", None, "refs/pr/1")),
    ("hf.co/org/Model-1.5B-GGUF:Q4_0", ModelRef("org/Model-1.5B-GGUF", "Q4_0")),
    ("llama3.2:Q8_0", ModelRef(ALIASES["llama3.2"], "Q8_0", None, alias="llama3.2")),
])
def test_references_parse(text, expected):
    assert parse_ref(text) == expected


@pytest.mark.parametrize("text", ["model.gguf", "./models/7B", "a/b/c", "nosuchalias", "org/na--me", "org/x.gguf",
                                  "/abs/path", "org/name:", "org/-bad", ""])
def test_paths_and_typos_are_not_references(text):
    assert parse_ref(text) is None


def test_a_missing_path_that_is_no_reference_says_so_without_the_network(monkeypatch):
    import socket

    def no_network(*a, **k):
        raise AssertionError("a network call was made")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(CheckpointNotFoundError, match="neither an existing path nor a model reference"):
        resolve_model("models/llama-2-7b/consolidated.00.pth")


def test_an_existing_path_is_returned_unchanged(tmp_path):
    folder = tmp_path / "org" / "name"  # also has a reference's shape: the path wins
    folder.mkdir(parents=True)
    assert resolve_model(str(folder)) == folder


GGUF_REPO = [RepoFile("README.md", 10), RepoFile("M-Q2_K.gguf", 50), RepoFile("M-IQ4_XS.gguf", 80), RepoFile("M-Q4_0.gguf", 90),
             RepoFile("M-Q8_0.gguf", 160), RepoFile("M-f16.gguf", 300), RepoFile("mmproj-M-f16.gguf", 20),
             RepoFile("big/M-Q6_K-00002-of-00002.gguf", 70), RepoFile("big/M-Q6_K-00001-of-00002.gguf", 70)]


def _no_index(name):
    raise AssertionError("no index needed")


def test_gguf_quant_choice_case_insensitive_with_splits_and_no_sidecars():
    quants = {m.quant for m in gguf_models(GGUF_REPO)}
    assert quants == {"Q2_K", "IQ4_XS", "Q4_0", "Q8_0", "F16", "Q6_K"}  # mmproj is not a model
    assert plan(GGUF_REPO, "q8_0", "o/M", _no_index).files == ("M-Q8_0.gguf",)
    split = plan(GGUF_REPO, "Q6_K", "o/M", _no_index)
    assert split.files == ("big/M-Q6_K-00001-of-00002.gguf", "big/M-Q6_K-00002-of-00002.gguf")
    assert split.primary == "big/M-Q6_K-00001-of-00002.gguf"


def test_default_quant_is_q4_k_m_else_the_smallest_of_at_least_4_bits():
    assert plan(GGUF_REPO, None, "o/M", _no_index).files == ("M-Q4_0.gguf",)  # not the 2-bit Q2_K, not an i-quant
    with_default = GGUF_REPO + [RepoFile("M-Q4_K_M.gguf", 100)]
    assert plan(with_default, None, "o/M", _no_index).files == ("M-Q4_K_M.gguf",)


def test_a_missing_quant_lists_the_ones_there_are():
    with pytest.raises(CheckpointNotFoundError, match=r"no Q5_K_M GGUF file; it has: F16, IQ4_XS, Q2_K, Q4_0, Q6_K, Q8_0"):
        plan(GGUF_REPO, "Q5_K_M", "o/M", _no_index)


def test_an_incomplete_split_is_not_a_model():
    assert gguf_models([RepoFile("M-Q6_K-00001-of-00002.gguf", 1)]) == []


def test_safetensors_files_come_from_the_index():
    listing = [RepoFile(n) for n in ("config.json", "tokenizer.json", "model.safetensors.index.json",
                                     "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                     "consolidated.safetensors", "onnx/model.onnx", "README.md")]
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    got = plan(listing, None, "o/M", lambda name: index)
    assert got.format == "hf"
    assert got.files == ("config.json", "tokenizer.json", "model.safetensors.index.json",
                         "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    assert hf_files([RepoFile("config.json"), RepoFile("model.safetensors"), RepoFile("consolidated.safetensors")],
                    _no_index) == ["config.json", "model.safetensors"]


def test_named_chat_templates_are_fetched_with_the_checkpoint():
    """transformers keeps named templates (tool_use) in additional_chat_templates/NAME.jinja."""
    listing = [RepoFile(n) for n in ("config.json", "chat_template.jinja", "additional_chat_templates/tool_use.jinja",
                                     "additional_chat_templates/old/x.jinja", "model.safetensors")]
    assert hf_files(listing, _no_index) == ["config.json", "chat_template.jinja",
                                           "additional_chat_templates/tool_use.jinja", "model.safetensors"]


def test_a_repository_without_a_loadable_checkpoint_says_what_it_has():
    with pytest.raises(CheckpointNotFoundError, match="it has: README.md, model.onnx"):
        plan([RepoFile("README.md"), RepoFile("model.onnx")], None, "o/M", _no_index)
    with pytest.raises(CheckpointNotFoundError, match="holds no GGUF files, so it has no Q8_0 quant"):
        plan([RepoFile("config.json"), RepoFile("model.safetensors")], "Q8_0", "o/M", _no_index)


@pytest.mark.parametrize("text, expected", [
    ("hf.co/unsloth/Qwen3-8B-GGUF:UD-Q4_K_XL", ModelRef("unsloth/Qwen3-8B-GGUF", "UD-Q4_K_XL")),  # was no reference
    ("org/name:latest", ModelRef("org/name")),  # Ollama's default tag (was a request for a quant "LATEST")
    ("hf.co/org/name:latest@v1", ModelRef("org/name", None, "v1")),
    ("llama3.2:3b", ModelRef(ALIASES["llama3.2-3b"], None, None, alias="llama3.2:3b")),  # was quant "3B"
    ("llama3.2:1b", ModelRef(ALIASES["llama3.2"], None, None, alias="llama3.2:1b")),
    ("smollm2:360m", ModelRef(ALIASES["smollm2-360m"], None, None, alias="smollm2:360m")),
    ("qwen2.5:0.5b", ModelRef(ALIASES["qwen2.5"], None, None, alias="qwen2.5:0.5b")),
    ("qwen2.5:latest", ModelRef(ALIASES["qwen2.5"], None, None, alias="qwen2.5")),
])
def test_references_as_ollama_and_llama_cpp_users_write_them(text, expected):
    assert parse_ref(text) == expected


UNSLOTH = [RepoFile("Qwen3-8B-Q4_K_XL.gguf", 50), RepoFile("Qwen3-8B-UD-Q4_K_XL.gguf", 60),
           RepoFile("UD-Q8_K_XL/Qwen3-8B-UD-Q8_K_XL-00001-of-00002.gguf", 70),
           RepoFile("UD-Q8_K_XL/Qwen3-8B-UD-Q8_K_XL-00002-of-00002.gguf", 70)]


@pytest.mark.parametrize("quant, files", [
    ("UD-Q4_K_XL", ("Qwen3-8B-UD-Q4_K_XL.gguf",)),
    ("q4_k_xl", ("Qwen3-8B-Q4_K_XL.gguf",)),  # the plain tag is the plain file, wherever it is listed
    ("UD-Q8_K_XL", ("UD-Q8_K_XL/Qwen3-8B-UD-Q8_K_XL-00001-of-00002.gguf",
                    "UD-Q8_K_XL/Qwen3-8B-UD-Q8_K_XL-00002-of-00002.gguf")),
])
def test_unsloth_dynamic_quant_tags_pick_their_files(quant, files):
    assert plan(UNSLOTH, quant, "unsloth/Qwen3-8B-GGUF", _no_index).files == files
    assert plan(list(reversed(UNSLOTH)), quant, "unsloth/Qwen3-8B-GGUF", _no_index).files == files
