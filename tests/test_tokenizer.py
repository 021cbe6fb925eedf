"""Tests of `llamaforge.tokenizer`: every kind against its reference library, on tiny real files.

The files are built here, in a temporary directory, in well under a second each: a sentencepiece
BPE model with byte fallback (Llama 1/2 style), a tiktoken BPE file (Llama 3 style), a `tokenizers`
byte-level BPE `tokenizer.json`, and vocabulary-only GGUF files written with `gguf.GGUFWriter` from
those (a "llama" sentencepiece vocabulary and "gpt2" byte-level vocabularies). The default model's
GGUF (SmolLM2-135M-Instruct) is checked against `tokenizers` built the way its Hugging Face
tokenizer.json is (Digits(individual_digits=True) + ByteLevel). Id sequences must be equal exactly.
"""

from __future__ import annotations

import base64
import heapq
import io
import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from llamaforge.errors import TokenizerError
from llamaforge.tokenizer import Tokenizer, read_gguf_metadata

# Meta llama3 `Tokenizer.pat_str`, copied from github meta-llama/llama3 llama/tokenizer.py
META_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TRICKY = [
    "Hello world",
    "",
    " ",
    "  two leading spaces",
    "trailing spaces   ",
    "\n\nnew\nlines\r\n and \t tabs\t\t",
    "digits 1234567890 and 3.14159, 1,000,000",
    "日本語のテキスト。中文文本，한국어",
    "emoji 🤖🎉👍🏽 family 👨‍👩‍👧",
    "café naïve Ünïcödé ǅ ß ﬁ",
    "<|eot_id|> <|im_end|> <|im_start|>user",
    "[INST] hi [/INST] <<SYS>> <</SYS>>",
    "<s>text</s> <unk>",
    "don't I'll we've THEY'RE",
    "x" * 300,
    "a  b   c    d",
    "\u00a0nbsp\u2009thin\u3000ideographic",
    "code: def f(x):\n    return x**2  # square",
    "\x00\x01\x7f control",
]

WORDS = (
    "the a tokenizer token model llama chat user assistant system hello world encode decode stream "
    "byte pair merge vocabulary special text number code python function return value café naïve "
    "日本 語 テキスト 中文 한국어 🤖 🎉"
).split()


def corpus() -> list[str]:
    rng = random.Random(0)
    lines = [t for t in TRICKY if t.strip() and "<" not in t and "[" not in t]
    for _ in range(400):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 10**6)))
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ",", ":", ""]))
    return lines


# ------------------------------------------------------------------------------------- builders


def train_sentencepiece(path: Path) -> Path:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=500, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, hard_vocab_limit=False, user_defined_symbols=["<|im_start|>"],
        control_symbols=["<|eot_id|>"], minloglevel=2, num_threads=1,
    )  # fmt: skip
    path.write_bytes(buf.getvalue())
    return path


def train_byte_bpe(special: list[str]) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=special, show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


def vocab_and_merges(tok: HFTokenizer) -> tuple[list[str], list[str]]:
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (written out independently of llamaforge)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiktoken_ranks(tok: HFTokenizer) -> tuple[dict[bytes, int], list[str]]:
    """Ranks: the 256 bytes, then each merge's result in merge order; and the merges themselves."""
    inv = {c: b for b, c in byte_alphabet().items()}
    ranks = {bytes([b]): b for b in range(256)}
    _, merges = vocab_and_merges(tok)
    kept = []
    for m in merges:
        raw = bytes(inv[c] for c in m.replace(" ", ""))
        if raw not in ranks:
            ranks[raw] = len(ranks)
            kept.append(m)
    return ranks, kept


def write_gguf(path: Path, model: str, tokens: list[str], types: list[int], **kv: object) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if "scores" in kv:
        w.add_token_scores(kv.pop("scores"))
    if "merges" in kv:
        w.add_token_merges(kv.pop("merges"))
    if "pre" in kv:
        w.add_tokenizer_pre(kv.pop("pre"))
    for key, value in kv.items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sp_token_types(sp: spm.SentencePieceProcessor) -> list[int]:
    """llama.cpp's convert script: normal 1, unknown 2, control 3, user-defined 4, unused 5, byte 6."""
    out = []
    for i in range(sp.vocab_size()):
        if sp.is_unknown(i):
            out.append(2)
        elif sp.is_control(i):
            out.append(3)
        elif sp.is_byte(i):
            out.append(6)
        elif sp.is_unused(i):
            out.append(5)
        elif sp.id_to_piece(i) == "<|im_start|>":  # the user-defined symbol trained above
            out.append(4)
        else:
            out.append(1)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tok")
    out: dict[str, Path] = {"sp": train_sentencepiece(d / "sp.model")}
    sp = spm.SentencePieceProcessor(model_file=str(out["sp"]))
    out["gguf_llama"] = write_gguf(
        d / "spm.gguf", "llama", [sp.id_to_piece(i) for i in range(sp.vocab_size())], sp_token_types(sp),
        scores=[sp.get_score(i) for i in range(sp.vocab_size())], bos_token_id=1, eos_token_id=2,
        unk_token_id=0, add_space_prefix=True,
    )  # fmt: skip
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = train_byte_bpe(special)
    tokens, merges = vocab_and_merges(bpe)
    types = [3 if t in special else 1 for t in tokens]
    for pre in ("smollm", "gpt-2"):
        out[f"gguf_{pre}"] = write_gguf(
            d / f"{pre}.gguf", "gpt2", tokens, types, merges=merges, pre=pre,
            bos_token_id=1, eos_token_id=2, chat_template="{{ messages[0]['content'] }}",
        )  # fmt: skip
    ranks, kept = tiktoken_ranks(bpe)
    alphabet = byte_alphabet()
    (d / "tiktoken").mkdir()
    out["tiktoken"] = d / "tiktoken" / "tokenizer.model"
    out["tiktoken"].write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    spelled = ["".join(alphabet[b] for b in t) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    out["gguf_llama-bpe"] = write_gguf(d / "llama-bpe.gguf", "gpt2", spelled, [1] * len(spelled), merges=kept, pre="llama-bpe")
    hf_dir = d / "hf"
    hf_dir.mkdir()
    hf = train_byte_bpe(special)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    hf.add_tokens(["<tool>"])  # a non-special added token: matched in text, as the library does
    hf.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": False,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
    }))  # fmt: skip
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    out["hf"] = hf_dir / "tokenizer.json"
    return out


@pytest.fixture(scope="module")
def toks(files: dict[str, Path]) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_file(path) for name, path in files.items()}


def default_model_path() -> Path:
    from llamaforge.default_model import default_model_path as locate

    return locate()


@pytest.fixture(scope="module")
def default_model() -> tuple[Tokenizer, dict[str, object]]:
    path = default_model_path()
    fields = read_gguf_metadata(path)
    return Tokenizer.from_gguf_metadata(fields, source=str(path)), fields


# ------------------------------------------------------------------------------------- kinds


def test_kinds_are_detected_from_contents(files: dict[str, Path], toks: dict[str, Tokenizer], tmp_path: Path) -> None:
    expected = {"sp": "sentencepiece", "tiktoken": "tiktoken", "hf": "hf", "gguf_llama": "gguf-llama", "gguf_smollm": "gguf-gpt2"}
    for name, kind in expected.items():
        assert toks[name].kind == kind
    # misleading names do not matter
    (tmp_path / "tokenizer.json").write_bytes(files["sp"].read_bytes())
    (tmp_path / "x.gguf").write_bytes(files["tiktoken"].read_bytes())
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").kind == "sentencepiece"
    assert Tokenizer.from_file(tmp_path / "x.gguf").kind == "tiktoken"
    # directories: tokenizer.json first, then tokenizer.model, then a single GGUF
    assert Tokenizer.from_file(files["hf"].parent).kind == "hf"
    assert Tokenizer.from_file(files["tiktoken"].parent).kind == "tiktoken"
    solo = tmp_path / "solo"
    solo.mkdir()
    (solo / "vocab.bin").write_bytes(files["gguf_llama"].read_bytes())
    assert Tokenizer.from_file(solo).kind == "gguf-llama"


def test_sentencepiece_matches_meta_llama2(files: dict[str, Path], toks: dict[str, Tokenizer]) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(files["sp"]))
    tok = toks["sp"]
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (sp.vocab_size(), 1, 2, sp.pad_id(), True)
    for s in TRICKY:
        assert tok.encode(s) == sp.encode(s), s
        assert tok.encode(s, True, False) == [1] + sp.encode(s)  # Meta's positional encode(s, bos, eos)
        assert tok.decode(sp.encode(s)) == sp.decode(sp.encode(s))
    assert tok.stop_ids == {2}
    assert tok.encode("<|eot_id|>x", allow_special=True) == [3] + sp.encode("x")


def test_tiktoken_matches_meta_llama3(files: dict[str, Path], toks: dict[str, Tokenizer]) -> None:
    ranks = {
        base64.b64decode(a): int(b) for a, b in (line.split() for line in files["tiktoken"].read_text().splitlines())
    }
    n = len(ranks)
    names = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
    names += ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
    special = {t: n + i for i, t in enumerate(names)}
    enc = tiktoken.Encoding("ref", pat_str=META_LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    tok = toks["tiktoken"]
    assert tok.special_tokens == special and len(special) == 256 and tok.n_words == n + 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (n, n + 1, -1, n + 9)
    assert tok.stop_ids == {n + 1, n + 9} and tok.add_bos
    for s in TRICKY:
        assert tok.encode(s) == enc.encode(s, allowed_special=set(), disallowed_special=()), s
        assert tok.encode(s, allow_special=True) == enc.encode(s, allowed_special="all", disallowed_special=()), s
        assert tok.decode(tok.encode(s)) == s
    # Meta cuts runs longer than 25k (non-)whitespace characters into separate tiktoken calls
    s = " " * 30_000 + "x" + "y" * 26_000
    want = enc.encode(" " * 25_000) + enc.encode(" " * 5_000 + "x" + "y" * 24_999) + enc.encode("y" * 1_001)
    assert tok.encode(s) == want
    assert tok.id_to_piece(n + 9) == "<|eot_id|>" and tok.token_to_id("<|eot_id|>") == n + 9
    assert tok.token_to_id(tok.id_to_piece(300)) == 300 and tok.token_to_id("no such piece") is None


def test_hf_json_matches_tokenizers(files: dict[str, Path], toks: dict[str, Tokenizer]) -> None:
    ref = HFTokenizer.from_file(str(files["hf"]))
    tok = toks["hf"]
    for s in TRICKY:
        if not any(t in s for t in tok.special_tokens):
            assert tok.encode(s) == ref.encode(s, add_special_tokens=False).ids, s
        assert tok.encode(s, allow_special=True) == ref.encode(s, add_special_tokens=False).ids, s
    # config files beside tokenizer.json
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.pad_id) == (1, 2, False, -1)
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    assert tok.stop_ids == {0, 2} and tok.eot_id == 2
    assert tok.encode("a<tool>b").count(ref.token_to_id("<tool>")) == 1  # non-special added tokens match


@pytest.mark.parametrize("pre", ["smollm", "gpt-2"])
def test_gguf_gpt2_vocab_matches_hf_pretokenizers(files: dict[str, Path], toks: dict[str, Tokenizer], pre: str) -> None:
    # reference: tokenizers built the way the Hugging Face tokenizer.json of such a model is
    bpe = train_byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    if pre == "smollm":
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    bpe.encode_special_tokens = True
    tok = toks[f"gguf_{pre}"]
    assert tok.kind == "gguf-gpt2" and not tok.add_bos and tok.chat_template
    for s in TRICKY:
        assert tok.encode(s) == bpe.encode(s, add_special_tokens=False).ids, s
        assert tok.decode(tok.encode(s)) == s


def test_gguf_user_defined_tokens_are_matched_and_decoded_as_text(files: dict[str, Path], tmp_path: Path) -> None:
    fields = read_gguf_metadata(files["gguf_gpt-2"])
    tokens = fields["tokenizer.ggml.tokens"] + ["<é>"]  # user-defined tokens are stored as plain text
    types = fields["tokenizer.ggml.token_type"] + [4]
    tok = Tokenizer.from_file(write_gguf(
        tmp_path / "ud.gguf", "gpt2", tokens, types, merges=fields["tokenizer.ggml.merges"], pre="gpt-2"
    ))  # fmt: skip
    ids = tok.encode("a<é>b")
    assert len(tokens) - 1 in ids and "<é>" not in tok.special_tokens  # matched even without allow_special
    assert tok.decode(ids) == "a<é>b"


def test_gguf_llama_bpe_vocab_matches_tiktoken(toks: dict[str, Tokenizer]) -> None:
    gg, tt = toks["gguf_llama-bpe"], toks["tiktoken"]
    assert gg.add_bos  # llama.cpp's default for llama-bpe
    for s in TRICKY + ["  \n\n\t x" * 7, "1234567 12 1"]:
        assert gg.encode(s) == tt.encode(s), s


# ------------------------------------------------------------------------------------- llama.cpp SPM


def llama_cpp_spm(tokens: list[str], scores: list[float], types: list[int], text: str, parse_special: bool) -> list[int]:
    """An independent python transcription of llama.cpp's SPM tokenize (llama-vocab.cpp):
    special-token partition, a space prefix per text fragment, then score-ordered bigram merging."""
    vocab = {t: i for i, t in enumerate(tokens)}
    kinds = (2, 3, 4) if parse_special else (4,)
    specials = sorted((i for i, ty in enumerate(types) if ty in kinds), key=lambda i: -len(tokens[i]))
    frags: list[str | int] = [text] if text else []
    for sid in specials:
        new: list[str | int] = []
        for f in frags:
            if isinstance(f, int):
                new.append(f)
                continue
            parts = f.split(tokens[sid])
            for k, p in enumerate(parts):
                if k:
                    new.append(sid)
                if p:
                    new.append(p)
        frags = new
    out: list[int] = []
    for f in frags:
        if isinstance(f, int):
            out.append(f)
            continue
        syms = list((" " + f).replace(" ", "▁"))
        alive = [True] * len(syms)
        nxt = list(range(1, len(syms))) + [-1]
        prv = list(range(-1, len(syms) - 1))
        heap: list[tuple[float, int, int, str]] = []

        def push(a: int, b: int) -> None:
            if a >= 0 and b >= 0 and syms[a] + syms[b] in vocab:
                heapq.heappush(heap, (-scores[vocab[syms[a] + syms[b]]], a, b, syms[a] + syms[b]))

        for i in range(len(syms) - 1):
            push(i, i + 1)
        while heap:
            _, a, b, merged = heapq.heappop(heap)
            if not (alive[a] and alive[b]) or nxt[a] != b or syms[a] + syms[b] != merged:
                continue
            syms[a], alive[b] = merged, False
            nxt[a] = nxt[b]
            if nxt[b] >= 0:
                prv[nxt[b]] = a
            push(prv[a], a)
            push(a, nxt[a])
        i = 0
        while i != -1:
            s = syms[i]
            out += [vocab[s]] if s in vocab else [vocab[f"<0x{b:02X}>"] for b in s.encode()]
            i = nxt[i]
    return out


def test_gguf_llama_vocab_matches_sentencepiece_and_llama_cpp(files: dict[str, Path], toks: dict[str, Tokenizer]) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(files["sp"]))
    tok = toks["gguf_llama"]
    tokens = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    scores = [sp.get_score(i) for i in range(sp.vocab_size())]
    types = sp_token_types(sp)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.n_words) == (1, 2, True, sp.vocab_size())
    rng = random.Random(1)
    alphabet = "ab ct okenizr\n\t日本🤖é_-=()1234<|>"
    texts = TRICKY + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(300)]
    for s in texts:
        ids = tok.encode(s)
        assert ids == llama_cpp_spm(tokens, scores, types, s, parse_special=False), s
        assert tok.encode(s, allow_special=True) == llama_cpp_spm(tokens, scores, types, s, parse_special=True), s
        if "<|im_start|>" not in s:  # llama.cpp splits user-defined tokens out first; sentencepiece does not
            assert ids == sp.encode(s), s
            assert tok.decode(ids) == sp.decode(ids) == s


def test_default_model_gguf_matches_smollm2_tokenizer_json(default_model: tuple[Tokenizer, dict]) -> None:
    tok, fields = default_model
    assert tok.kind == "gguf-gpt2" and tok.n_words == 49152
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert tok.special_tokens["<|im_end|>"] == 2 and {0, 2} <= tok.stop_ids and tok.eot_id == 2
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    # SmolLM2's tokenizer.json: BPE + Digits(individual_digits=True) + ByteLevel; special added tokens
    toks_ = fields["tokenizer.ggml.tokens"]
    ref = HFTokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(toks_)}, merges=[tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]])
    )
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    ref.decoder = decoders.ByteLevel()
    for s in TRICKY + ["The quick brown fox jumps over 13 lazy dogs.", "x = [1, 2, 3]\nprint(x)"]:
        assert tok.encode(s) == ref.encode(s).ids, s
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode("<|im_start|>user\nhi<|im_end|>", allow_special=True)[0] == 1
    assert 1 not in tok.encode("<|im_start|>user")


# ------------------------------------------------------------------------------------- properties

KINDS = ["sp", "tiktoken", "hf", "gguf_llama", "gguf_smollm", "gguf_llama-bpe"]
# U+2581 is sentencepiece's space symbol (decodes to " "); lone surrogates cannot be UTF-8
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=40)


@pytest.mark.parametrize("name", KINDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=TEXT)
def test_round_trip_and_streaming(toks: dict[str, Tokenizer], name: str, s: str) -> None:
    tok = toks[name]
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == s
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in s


@pytest.mark.parametrize("name", KINDS)
def test_special_strings_stay_text(toks: dict[str, Tokenizer], name: str) -> None:
    tok = toks[name]
    s = "x <|eot_id|> <|im_end|> <|im_start|> [INST] <s> </s> <unk> <|endoftext|> <|begin_of_text|>"
    if name == "gguf_llama":  # there <|im_start|> is user-defined: always matched, then a space prefix (llama.cpp)
        s = s.replace("<|im_start|> ", "")
    ids = tok.encode(s)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == s
    for text, i in tok.special_tokens.items():
        assert tok.encode(text, allow_special=True) == [i]
    copy = pickle.loads(pickle.dumps(tok))  # e.g. for data-loader worker processes
    assert copy.encode(s) == ids and copy.encode(s, allow_special=True) == tok.encode(s, allow_special=True)


@pytest.mark.parametrize("name", ["sp", "gguf_llama"])
def test_stream_never_splits_characters(toks: dict[str, Tokenizer], name: str) -> None:
    tok = toks[name]
    s = "Ωmega ⟨x⟩ 🤖🎉 ǅ"
    ids = tok.encode(s)
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)  # byte fallback in play
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    assert "" in pieces and all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == s
    # an unfinished character is only given out (as U+FFFD) by flush
    first = [i for i in ids if tok.id_to_piece(i).startswith("<0x")][0]
    stream.push(first)
    assert stream.flush() == "\ufffd"


@pytest.mark.parametrize("name", KINDS)
def test_token_bytes_spell_the_decoded_text(toks: dict[str, Tokenizer], name: str) -> None:
    """Each back-end's token bytes join into the UTF-8 of the decoded text (byte fallback and characters split
    over tokens included; sentencepiece kinds keep the space its decoder strips at the start); a special
    token is its text. Exact."""
    tok = toks[name]
    for s in ["Hello, wörld!", "Ωmega ⟨x⟩ 🤖🎉", "tab\tand\nnewline 12", "<tool> café"]:
        ids = tok.encode(s)
        text = tok.decode(ids).encode("utf-8")
        assert b"".join(tok.token_bytes(i) for i in ids) in (text, b" " + text)
    assert tok.eos_id is None or tok.eos_id in tok.special_ids
    for i in tok.special_ids:
        assert tok.token_bytes(i) == tok.id_to_piece(i).encode("utf-8")
    assert len(tok.token_bytes_table()) == tok.n_words
    with pytest.raises(TokenizerError):
        tok.token_bytes(tok.n_words)


def test_bos_eos_and_bad_ids(toks: dict[str, Tokenizer]) -> None:
    tok = toks["gguf_llama"]
    assert tok.encode("hi", True, True) == [1, *tok.encode("hi"), 2]
    with pytest.raises(TokenizerError, match="no BOS"):
        toks["gguf_llama-bpe"].encode("hi", bos=True)
    with pytest.raises(TokenizerError, match="str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    for bad in (-1, tok.n_words, "3", 1.5):
        with pytest.raises(TokenizerError):
            tok.decode([5, bad])  # type: ignore[list-item]
    assert tok.id_to_piece(1) == "<s>" and tok.token_to_id("<s>") == 1 and tok.token_to_id("no-such") is None


def test_gguf_metadata_helpers(files: dict[str, Path]) -> None:
    fields = read_gguf_metadata(files["gguf_smollm"])
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert isinstance(fields["tokenizer.ggml.tokens"], list) and isinstance(fields["tokenizer.ggml.tokens"][0], str)
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and isinstance(fields["tokenizer.ggml.token_type"][0], int)
    a, b = Tokenizer.from_gguf_metadata(fields), Tokenizer.from_file(files["gguf_smollm"])
    assert a.encode(TRICKY[8]) == b.encode(TRICKY[8])
    bad = dict(fields, **{"tokenizer.ggml.pre": "nope"})
    with pytest.raises(TokenizerError, match="known: .*llama-bpe.*smollm"):
        Tokenizer.from_gguf_metadata(bad)
    with pytest.raises(TokenizerError, match="'bert' is not supported"):
        Tokenizer.from_gguf_metadata(dict(fields, **{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(TokenizerError, match="no tokenizer.ggml.model"):
        Tokenizer.from_gguf_metadata({"general.architecture": "llama"})


def test_bad_files_raise_tokenizer_error(files: dict[str, Path], tmp_path: Path) -> None:
    def bad(name: str, data: bytes | str) -> Path:
        p = tmp_path / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p

    sp_bytes, gguf_bytes = files["sp"].read_bytes(), files["gguf_llama"].read_bytes()
    cases = {
        bad("empty.model", b""): "empty",
        bad("random.bin", bytes(random.Random(0).randrange(256) for _ in range(500)) + b"\x00"): "not a tokenizer",
        bad("half.model", sp_bytes[: len(sp_bytes) // 2]): "sentencepiece",
        bad("short.gguf", gguf_bytes[:1000]): "GGUF",
        bad("magic.gguf", b"GGUF\x03\x00"): "GGUF",
        bad("config.json", json.dumps({"vocab_size": 3})): "not a Hugging Face tokenizer.json",
        bad("cut.json", files["hf"].read_text()[:500]): "does not parse",
        bad("tik.model", "IQ== 0\nIg== 1\nnot base64!! x\n"): "line 3",
        bad("gap.model", "IQ== 0\nIg== 5\n"): "ranks",
        tmp_path / "missing.model": "does not exist",
    }
    for path, message in cases.items():
        with pytest.raises(TokenizerError, match=message) as info:
            Tokenizer.from_file(path)
        assert path.name in str(info.value)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        Tokenizer.from_file(empty)


def test_tokenizer_and_chat_do_not_import_torch() -> None:
    code = "import sys; sys.modules['torch'] = None; import llamaforge.tokenizer, llamaforge.chat"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_lone_surrogates_are_a_tokenizer_error(toks: dict[str, Tokenizer]) -> None:
    # pytest.raises fails when nothing is raised, and lets any other exception through as a failure
    for name, tok in toks.items():
        for text in ("a\ud800b", "\udfff", "ok \udc80"):
            with pytest.raises(TokenizerError, match="valid Unicode"):
                tok.encode(text)
            with pytest.raises(TokenizerError, match="valid Unicode"):
                tok.encode(text, allow_special=True)


def test_gguf_merges_split_where_llama_cpp_splits_them() -> None:
    """`split_merges` (str.split in C where no merge starts with a space) gives llama.cpp's split, at the first
    space after the first character, on every shape of merge; one without that space is a TokenizerError."""
    from llamaforge.errors import TokenizerError
    from llamaforge.tokenizers.gguf_vocab import _ids_of, split_merges

    def llama_cpp(m: str) -> tuple[str, str]:
        pos = m.find(" ", 1)
        return m[:pos], m[pos + 1:]

    plain = ["Ġ t", "Ġt he", "a  b", "a b c", "é ü", "x "]
    with_leading_space = plain + ["  a", " a b"]
    for raw in (plain, with_leading_space):
        assert split_merges(raw, "f.gguf") == [llama_cpp(m) for m in raw]
    for bad in (["a b", "ab"], ["a b", " ab"]):
        with pytest.raises(TokenizerError, match="no space separating"):
            split_merges(bad, "f.gguf")
    types = [1, 3, 1, 4, 2, 3, 1, 4]
    assert _ids_of(types, (3, 2)) == [1, 4, 5] and _ids_of(types, (4,)) == [3, 7] and _ids_of(types, (6,)) == []
