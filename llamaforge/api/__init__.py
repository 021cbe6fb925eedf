"""`Llama`: Meta's public API (build, generate, text_completion, chat_completion) on any machine.

The one front door: it combines a checkpoint (Meta, Hugging Face or GGUF, detected from its
contents), a tokenizer, the device policy and THE engine (`generation/`). `Llama.build` runs in one
process on CPU, MPS or CUDA without torch.distributed; results equal Meta's reference `generate`
(greedy tokens exactly, logprobs to float tolerance in float32).

Every call runs on one continuous-batching engine per `Llama` (started on first use), so calls from
several threads share its decode steps, and each gets what it would get alone. One exception keeps
Meta's results exact: a sampled batch of several prompts (Meta draws them together from one
generator, teacher-forced rows included) runs Meta's lock-step mode (`generation/generate.py`)
unless it asks for something only the engine does (n, stop strings, penalties, logit_bias,
response_format). The server, the CLI and spaCy use this class; the names the server needs from the
engine are re-exported here, so nothing above `api` imports `generation` itself.

The package, by concept:
    llama.py     the `Llama` class: construction, Meta's generate / text_completion / chat_completion, streaming
    build.py     `Llama.build`: checkpoint -> tokenizer -> context length -> `runtime.prepare`
    dispatch.py  a call's arguments -> engine jobs, Meta's lock-step mode or speculative decoding -> Meta's rows
    engines.py   the engine a Llama runs on (and the server's), tensor-parallel followers, LoRA adapters, grammar
"""

from __future__ import annotations

import gc
import os

from llamaforge.api.build import kv_bytes_per_token
from llamaforge.api.llama import UNSAFE_ERROR, ChatPrediction, CompletionPrediction, Llama
from llamaforge.chat import has_special_tags
from llamaforge.generation import (
    Delta, Engine, EngineClosed, Event, Failure, Finish, Job, PromptDone, QueueFull, SamplingParams, TokenInfo,
)
from llamaforge.generation.grammar import GrammarError, GrammarUnavailable

# Everything imported by now (torch and the rest: ~170k objects the cyclic collector tracks) lives as long as
# the process. Frozen out of the collector's sight (gc.freeze: reference counting still frees them), a full
# collection walks only what came after: one fell inside every load, ~0.1 s of one core (a quarter of the
# default model's load; benchmarks/RESULTS.md), and would fall inside serving later. Pausing the collector
# during the load only moved it to the pause's end. Only reference cycles made before this import and
# dropped later are never collected; LLAMAFORGE_GC_FREEZE=0 leaves the collector as it is.
if os.environ.get("LLAMAFORGE_GC_FREEZE", "1") != "0":
    gc.freeze()

# The engine's types, for the layers above (server): they import them from here.
__all__ = [
    "Llama", "CompletionPrediction", "ChatPrediction", "UNSAFE_ERROR", "Engine", "Job", "Delta", "Finish",
    "PromptDone", "Failure", "Event", "QueueFull", "EngineClosed", "SamplingParams", "TokenInfo", "GrammarError",
    "GrammarUnavailable", "has_special_tags", "kv_bytes_per_token",
]
