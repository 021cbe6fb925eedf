"""The Llama transformer: shapes (ModelArgs), layers, KV cache. Pure tensor maths, no I/O."""

from llamaforge.model.args import ModelArgs, RopeScaling

__all__ = ["ModelArgs", "RopeScaling"]
