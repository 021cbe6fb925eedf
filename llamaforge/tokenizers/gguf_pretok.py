"""The pre-tokenizer of every common GGUF byte-level BPE vocabulary (`tokenizer.ggml.pre`).

llama.cpp (`src/llama-vocab.cpp`, `llm_tokenizer_bpe`) maps the name stored in a GGUF file to a list
of regular expressions; the text is split by the first, each piece by the next, and so on, every
match and every gap between matches becoming a piece of its own. A `tokenizers` `Sequence` of
`Split(..., behavior="isolated")` pre-tokenizers does exactly that. Where llama.cpp rewrote a
model's regex for its own regex engine (case-insensitive groups spelled out, `\\p{Lu}` emulated
with look-aheads) and kept the original in a comment, the original is used here: it is what the
model's own `tokenizer.json` runs and what llama.cpp's rewrite imitates.

`ignore_merges` (a whole piece found in the vocabulary is taken as one token before any merge) and
the default of `add_bos` follow llama.cpp's loader for the same names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PreTokenizer:
    """How one `tokenizer.ggml.pre` name splits text before byte-level BPE."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token
    has_bos: bool = True  # False where llama.cpp clears the BOS id (chatglm)


_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_SEED_CODER = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
    r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_BAILINGMOE = (
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)

_MINICPM5 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"

_DEEPSEEK_LLM = (
    "[\r\n]",
    # Six letters of this class are Unicode singletons (U+1F7D, U+1FBE, U+1FD3, U+1FDB, U+2126, U+212A)
    # that NFC normalisation (editors, copy and paste) turns into other characters, leaving "empty
    # ranges" Oniguruma refuses and a K-to-U+212D range that swallows punctuation: they are escapes.
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-" "\u1f7d" r"ᾀ-ᾴᾶ-ᾼ" "\u1fbe" r"ῂ-ῄῆ-ῌῐ-" "\u1fd3" r"ῖ-" "\u1fdb" r"ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ" "\u2126" r"ℨ" "\u212a" r"-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
)

_DEEPSEEK_CODER = (
    "[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    "[一-龥ࠀ-一가-퟿]+",
    r"\p{N}",
)

_DEEPSEEK3 = (
    r"\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)

_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]")
_STARCODER = (r"\p{N}", _GPT2)


def _table() -> dict[str, PreTokenizer]:
    table: dict[str, PreTokenizer] = {"default": PreTokenizer(_DEFAULT)}

    def put(names: str, pre: PreTokenizer) -> None:
        for name in names.split():
            table[name] = pre

    put(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
        PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True),
    )
    put("dbrx smaug-bpe", PreTokenizer((_LLAMA3,)))
    put("glm4 chatglm-bpe", PreTokenizer((_LLAMA3,), has_bos=False))
    put("deepseek-llm", PreTokenizer(_DEEPSEEK_LLM))
    put("deepseek-coder", PreTokenizer(_DEEPSEEK_CODER))
    put("deepseek-v3 hunyuan-dense joyai-llm hy_v4", PreTokenizer(_DEEPSEEK3))
    put("falcon", PreTokenizer(_FALCON))
    put(
        "starcoder refact command-r smollm codeshell exaone minerva-7b mellum2",
        PreTokenizer(_STARCODER),
    )
    put(
        "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert "
        "jina-v1-en jina-v2-code roberta-bpe mpt olmo jais exaone4 trillion granite-docling",
        PreTokenizer((_GPT2,)),
    )
    put(
        "qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open grok-2",
        PreTokenizer((_QWEN2,)),
    )
    put("qwen35", PreTokenizer((_QWEN35,)))
    put("poro-chat bloom gpt3-finnish", PreTokenizer((_PORO,)))
    put("viking", PreTokenizer((_PORO, r"\p{N}")))
    put("tekken", PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True))
    put("gpt-4o llama4 kanana2 talkie minimax-m2", PreTokenizer((_GPT4O,)))
    put("seed-coder", PreTokenizer((_SEED_CODER,)))
    put("bailingmoe bailingmoe2 llada-moe", PreTokenizer((_BAILINGMOE,)))
    put("minicpm5", PreTokenizer((r"\p{N}{1,3}", _MINICPM5), ignore_merges=True))
    return table


PRE_TOKENIZERS: dict[str, PreTokenizer] = _table()
