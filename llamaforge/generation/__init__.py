"""Sampling and Meta-exact token generation over a Transformer and a KV cache."""

from llamaforge.generation.generate import generate, iterate
from llamaforge.generation.sampling import SamplingParams, sample, sample_top_p

__all__ = ["generate", "iterate", "SamplingParams", "sample", "sample_top_p"]
