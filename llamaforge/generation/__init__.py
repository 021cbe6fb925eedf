"""THE engine (continuous batching over a slot pool), the one sampler, and Meta's lock-step mode.

No HTTP here: `Llama` (llamaforge/api/) is the front door over this package, and the server, the CLI and spaCy
go through `Llama`. See docs/architecture.md for the path of a request.
"""

from llamaforge.generation.checks import check_prompts
from llamaforge.generation.engine import Engine, wait_idle
from llamaforge.generation.generate import generate, meta_cut
from llamaforge.generation.jobs import Delta, EngineClosed, Event, Failure, Finish, Job, PromptDone, QueueFull, Sink
from llamaforge.generation.sampler import SamplingParams, TokenInfo, sample, sample_top_p

__all__ = [
    "Engine", "wait_idle", "generate", "meta_cut", "check_prompts", "Job", "Delta", "Finish", "PromptDone",
    "Failure", "Event", "Sink", "QueueFull", "EngineClosed", "SamplingParams", "TokenInfo", "sample", "sample_top_p",
]
