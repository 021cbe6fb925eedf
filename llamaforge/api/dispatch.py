"""From the arguments of a `Llama` call to the work that answers it, and back to Meta's rows.

`generate_rows` is what `generate`, `text_completion` and `chat_completion` share: it checks the arguments
(`generation/checks.py`, `SamplingParams`), picks how the rows are made, and returns them cut as Meta's
(`meta_cut`):
- on the engine, one `Job` per prompt (`run_jobs`), sharing decode steps with every other call: the usual way;
- Meta's lock-step mode (`generation/generate.py`) for a sampled batch of several prompts that asks for
  nothing only the engine does, so that a seeded batch draws Meta's very tokens;
- speculative decoding (`generation/speculative.py`) when asked for, greedy only.
The last two run their model calls on the engine's thread (`Engine.call`), not the caller's: a caller's
thread that did OpenMP work keeps a libgomp pool beside the engine thread's, which slows every later step
(benchmarks/RESULTS.md). `make_stream_job` makes the one job of a streaming call.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from llamaforge import runtime
from llamaforge.api.engines import EngineHost
from llamaforge.errors import GenerationError
from llamaforge.generation import Job, SamplingParams, generate, meta_cut
from llamaforge.generation.calls import run_jobs
from llamaforge.generation.checks import check_max_gen_len, check_n, check_prompts, check_seed, check_stop
from llamaforge.generation.checks import check_stop_ids

SAMPLING_OPTIONS = ("min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "logit_bias")


def sampling(temperature, top_p, top_k=None, min_p=0.0, repetition_penalty=1.0, frequency_penalty=0.0,
             presence_penalty=0.0, logit_bias=None) -> SamplingParams:
    """The validated sampler settings of a call."""
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                          repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                          presence_penalty=presence_penalty, logit_bias=logit_bias or ())


def take_sampling_options(options: dict) -> dict:
    """Take the sampler's keyword arguments out of `options` (the rest go to `generate_rows`)."""
    return {k: options.pop(k) for k in SAMPLING_OPTIONS if k in options}


def generate_rows(llama: EngineHost, prompt_tokens, max_gen_len: int, params: SamplingParams, *,
                  logprobs: bool = False, echo: bool = False, seed=None, stop_ids=None, stop=None, n: int = 1,
                  response_format=None, speculative=None):
    """(tokens per row, logprobs per row or None, engine text per row or None) with Meta's output cut."""
    prompt_tokens = check_prompts(prompt_tokens, llama.args.vocab_size, llama.max_seq_len)
    check_batch(llama, prompt_tokens)
    max_gen_len, seed, n = check_max_gen_len(max_gen_len), check_seed(seed), check_n(n)
    stops = resolve_stop_ids(llama, stop_ids)
    stop_strings = check_stop(stop)
    constraint = llama.grammar.response_format(response_format) if response_format is not None else None
    engine_only = n > 1 or stop_strings or constraint is not None or params.logit_bias or params.counts_output
    if speculative is not None:
        if not params.greedy or logprobs or engine_only:
            raise GenerationError(
                "speculative decoding reproduces plain greedy output: it needs temperature=0 and none of "
                "logprobs, n > 1, stop, penalties, logit_bias or response_format")
        rows = llama.engine.call(lambda: speculative_rows(llama, prompt_tokens, max_gen_len, speculative, stops,
                                                          echo)).result()
        return rows, None, None
    if params.temperature > 0 and len(prompt_tokens) > 1 and not engine_only:
        # Meta's lock-step mode: the batch's draws in Meta's order, from one generator.
        tokens, lps = llama.engine.call(lambda: generate(
            llama.model, prompt_tokens, max_gen_len=max_gen_len, max_seq_len=llama.max_seq_len, params=params,
            stop_ids=stops, device=llama.device, logprobs=logprobs, echo=echo, generator=generator(llama, seed),
            decode_step=llama.decode_step)).result()
        return tokens, lps, None
    jobs = [Job(p, min(max_gen_len, llama.max_seq_len - len(p)), params, n=n,
                seed=None if seed is None else seed + i * n, global_rng=True, stop_ids=stops, stop=stop_strings,
                logprobs=0 if logprobs else None, prompt_logprobs=0 if logprobs and echo else None,
                constraint=constraint, detokenize=bool(stop_strings))
            for i, p in enumerate(prompt_tokens)]
    out_tokens, out_lps, texts = [], [], []
    for p, res in zip(prompt_tokens, run_jobs(llama.engine, jobs)):
        prompt_lps = [0.0] * len(p)
        if res.prompt_logprobs is not None:
            prompt_lps[1:] = [t.logprob for t in res.prompt_logprobs[1:]]
        for choice in res.choices:
            toks = p + [t.id for t in choice.tokens]
            lps = prompt_lps + [t.logprob for t in choice.tokens] if logprobs else None
            toks, lps = meta_cut(toks, lps, len(p), max_gen_len, echo, stops)
            out_tokens.append(toks)
            out_lps.append(lps)
            texts.append("".join(choice.text))
    return out_tokens, (out_lps if logprobs else None), texts


def speculative_rows(llama: EngineHost, prompt_tokens, max_gen_len: int, speculative, stops: frozenset[int],
                     echo: bool) -> list[list[int]]:
    """Greedy rows by speculative decoding (generation/speculative.py), cut as Meta's."""
    from llamaforge.generation import speculative as spec

    if speculative == "ngram":
        drafter: Any = spec.NgramDrafter()
    elif isinstance(speculative, EngineHost):  # a draft Llama
        spec.check_same_vocabulary(llama.tokenizer, speculative.tokenizer)
        if speculative.args.vocab_size != llama.args.vocab_size:
            raise GenerationError(f"the draft model's output has {speculative.args.vocab_size} logits, this "
                                  f"model's {llama.args.vocab_size}: a draft model must share the vocabulary")
        length = min(llama.max_seq_len, speculative.max_seq_len)
        drafter = spec.ModelDrafter(spec.model_steps(speculative.model, length, own_decode_step(speculative)))
    else:
        raise GenerationError(f"speculative must be 'ngram' or a draft Llama, got {speculative!r}")
    target = spec.model_steps(llama.model, llama.max_seq_len, own_decode_step(llama))
    planner = spec.DraftPlanner()  # one for the call: what it measured on one prompt helps the next
    rows = []
    for p in prompt_tokens:
        n_new = min(max_gen_len, llama.max_seq_len - len(p))
        if isinstance(drafter, spec.ModelDrafter):
            n_new = min(n_new, drafter.steps.max_seq_len - len(p))
        out = spec.speculative_greedy(target, p, n_new, drafter, stop_ids=sorted(stops), planner=planner)
        rows.append(meta_cut(p + out, None, len(p), max_gen_len, echo, stops)[0])
    return rows


def own_decode_step(llama: EngineHost) -> runtime.DecodeStep:
    """A DecodeStep like the Llama's for steps beside the engine's own (a fused step holds state)."""
    return runtime.DecodeStep(llama.model, fused=llama.decode_step.fused is not None, kv_type=llama.kv_type)


def make_stream_job(llama: EngineHost, prompt_tokens, max_gen_len, temperature, top_p, top_k, seed, options: dict, *,
               text: bool) -> Job:
    """The one job of a streaming call (`text`: the engine detokenizes it)."""
    prompt = check_prompts([prompt_tokens], llama.args.vocab_size, llama.max_seq_len)[0]
    if max_gen_len is None:
        max_gen_len = llama.max_seq_len - 1
    max_gen_len, seed = check_max_gen_len(max_gen_len), check_seed(seed)
    options = dict(options)
    params = sampling(temperature, top_p, top_k, **take_sampling_options(options))
    stop_ids = resolve_stop_ids(llama, options.pop("stop_ids", None))
    stop = check_stop(options.pop("stop", None))
    fmt = options.pop("response_format", None)
    if options:
        raise GenerationError(f"unknown argument(s) for a stream: {sorted(options)}")
    return Job(prompt, min(max_gen_len, llama.max_seq_len - len(prompt)), params, seed=seed, global_rng=True,
               stop_ids=stop_ids, stop=stop, constraint=llama.grammar.response_format(fmt) if fmt else None,
               detokenize=text)


def check_batch(llama: EngineHost, prompt_tokens: Sequence[Sequence[int]]) -> None:
    if len(prompt_tokens) > llama.max_batch_size:
        raise GenerationError(
            f"{len(prompt_tokens)} prompts given but max_batch_size is {llama.max_batch_size}; "
            f"split the batch or build with a larger max_batch_size"
        )


def resolve_stop_ids(llama: EngineHost, stop_ids: Optional[Sequence[int]]) -> frozenset[int]:
    """The caller's stop ids, checked, or the tokenizer's."""
    checked = check_stop_ids(stop_ids, llama.args.vocab_size)
    return llama.tokenizer.stop_ids if checked is None else checked


def generator(llama: EngineHost, seed: Optional[int]) -> Optional[torch.Generator]:
    """A private generator seeded with `seed`, or None (torch's global one)."""
    if seed is None:
        return None
    gen = torch.Generator(device=llama.device)
    gen.manual_seed(int(seed))
    return gen
