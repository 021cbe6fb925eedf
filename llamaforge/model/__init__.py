"""The Llama transformer: shapes (ModelArgs), layers, KV cache, step inputs. Pure tensor maths on float
modules, no I/O; nothing here imports quantize or kernels (quantized layers are swapped in from above)."""

from llamaforge.model.args import ModelArgs, RopeScaling
from llamaforge.model.kv_cache import KVCache
from llamaforge.model.step import StepInput
from llamaforge.model.transformer import Transformer, build_model, check_weights, empty_model, load_weights

__all__ = ["ModelArgs", "RopeScaling", "KVCache", "StepInput", "Transformer", "build_model", "check_weights",
           "empty_model", "load_weights"]
