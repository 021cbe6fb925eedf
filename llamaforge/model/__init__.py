"""The Llama transformer: shapes (ModelArgs), layers, KV cache. Pure tensor maths, no I/O."""

from llamaforge.model.args import ModelArgs, RopeScaling
from llamaforge.model.kv_cache import KVCache
from llamaforge.model.transformer import Transformer, build_model

__all__ = ["ModelArgs", "RopeScaling", "KVCache", "Transformer", "build_model"]
