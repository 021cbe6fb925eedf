"""The engine side of a `Llama`: the engine its calls run on, the server's engine, tensor-parallel followers,
served LoRA adapters and constrained decoding.

`EngineHost` is the part of `Llama` (which inherits it) that owns the continuous-batching engine
(`generation/engine.py`): `engine`, made and started on first use, is where every generation call of the
Python API goes; `open_engine` makes one with the server's settings instead. Under tensor parallelism rank
0's served engine leads (`mirror.Leader`) and the other ranks `follow`.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from llamaforge import runtime
from llamaforge.errors import ConfigError
from llamaforge.generation import Engine, mirror
from llamaforge.generation.grammar import GrammarCompiler
from llamaforge.generation.runner import Runner
from llamaforge.model import KVCache

if TYPE_CHECKING:
    import torch

    from llamaforge.chat import ChatFormat
    from llamaforge.model import ModelArgs, Transformer
    from llamaforge.tokenizer import Tokenizer


class EngineHost:
    """The engine surface of `Llama` (see the module docstring); `Llama.__init__` calls `_init_engines`."""

    model: "Transformer"
    tokenizer: "Tokenizer"
    decode_step: runtime.DecodeStep
    chat_format: "ChatFormat"
    max_seq_len: int
    max_batch_size: int
    device: "torch.device"
    rank: int
    world: int
    args: "ModelArgs"
    kv_type: str

    def _init_engines(self) -> None:
        self._engine: Optional[Engine] = None
        self._engine_owned = False
        self._engine_lock = threading.Lock()
        self._grammar: Optional[GrammarCompiler] = None
        self.adapters = runtime.AdapterTable(self.model)  # LoRA adapters served over this model (load_adapter)

    @property
    def engine(self) -> Engine:
        """The engine every generation call of this Llama runs on (made and started on first use)."""
        with self._engine_lock:
            if self._engine is None or self._engine.closed:
                self._set_engine(Engine(self.model, self.tokenizer, n_slots=self.max_batch_size,
                                        max_seq_len=self.max_seq_len, device=self.device, max_queue=256,
                                        decode_step=self.decode_step, adapters=self.adapters), owned=True)
                self._engine.start()
            return self._engine

    def open_engine(self, *, n_slots: Optional[int] = None, max_queue: int = 64, max_num_batched_tokens: int = 256,
                    prefix_reuse: bool = True, kv_memory: Optional[int] = None) -> Engine:
        """A new engine with these settings, which this Llama's calls use from now on; not started: its
        owner (the server, with its flags) calls `start()` and `close()`. Calls made before it starts wait.
        `kv_memory`: bytes of the KV block pool (default: every slot at `max_seq_len`).
        Under tensor parallelism it is rank 0's, and leads the other ranks (which call `follow`); the
        engine of the Python calls (`engine`) instead runs on every rank with the same inputs, as Meta's.

        An engine this Llama made itself is closed; one opened earlier is left to its owner.
        """
        with self._engine_lock:
            self._set_engine(Engine(self.model, self.tokenizer, n_slots=n_slots or self.max_batch_size,
                                    max_seq_len=self.max_seq_len, device=self.device, max_queue=max_queue,
                                    max_num_batched_tokens=max_num_batched_tokens, prefix_reuse=prefix_reuse,
                                    decode_step=self.decode_step, adapters=self.adapters,
                                    runner=self._leader(), kv_blocks=self._kv_blocks(kv_memory)), owned=False)
            return self._engine

    def _kv_blocks(self, kv_memory: Optional[int]) -> Optional[int]:
        """Blocks of 64 positions `kv_memory` bytes of KV cache hold (None: the engine's default)."""
        if kv_memory is None:
            return None
        return kv_memory // KVCache.bytes_per_block(self.model.args, self.kv_type)

    def _set_engine(self, engine: Engine, *, owned: bool) -> None:
        if self._engine is not None and self._engine_owned:
            self._engine.close()
        self._engine, self._engine_owned = engine, owned
        weakref.finalize(self, engine.close)  # the engine thread ends with its Llama (and at exit)

    # -- tensor parallelism -----------------------------------------------------------------------

    def _leader(self) -> Optional[mirror.Leader]:
        """Under tensor parallelism, the served engine's runner on rank 0: it repeats each model call on every rank."""
        if self.world == 1:
            return None
        if self.rank != 0:
            raise ConfigError(f"rank {self.rank} of a tensor-parallel launch runs no engine: call Llama.follow()")
        return mirror.Leader(self.model, self.device, self.decode_step)

    def follow(self) -> None:
        """Ranks > 0 of a tensor-parallel launch: run rank 0's engine's model calls until it ends the serving
        (`stop_followers`). Rank 0 serves (its engine leads); this is how `serve` runs under torchrun."""
        if self.world == 1 or self.rank == 0:
            raise ConfigError("Llama.follow() is for ranks > 0 of a tensor-parallel (torchrun) launch")
        mirror.follow(Runner(self.model, self.device, self.decode_step))

    def stop_followers(self) -> None:
        """Rank 0 of a tensor-parallel launch, once its engine is closed: end `follow` on the other ranks."""
        if self.world > 1 and self.rank == 0:
            mirror.Leader(self.model, self.device, self.decode_step).stop_followers()

    # -- LoRA adapters and constrained decoding ---------------------------------------------------

    def load_adapter(self, name: str, path: Union[str, Path]) -> None:
        """Serve the LoRA adapter at `path` (a PEFT folder: adapter_config.json + adapter_model.safetensors, or a
        GGUF LoRA file) as `name`: a job with `adapter=name` gets it, in the same batches as the base model and
        other adapters.

        Raises:
            CheckpointError: `path` is no LoRA adapter for this model (or adapts more than the blocks' projections).
            ConfigError: an empty name, or a projection that cannot take an adapter.
        """
        if self.world > 1:
            raise ConfigError("LoRA adapters are not served under tensor parallelism; serve them on one process")
        self.adapters.add(name, path)

    def remove_adapter(self, name: str) -> None:
        """Stop serving adapter `name` (requests already running with it finish with it); ConfigError if unknown."""
        self.adapters.remove(name)

    @property
    def grammar(self) -> GrammarCompiler:
        """Constrained decoding (JSON schemas) over this tokenizer; llguidance is imported on first use."""
        if self._grammar is None:
            stops = frozenset(self.tokenizer.stop_ids) | frozenset(self.chat_format.stop_ids)
            self._grammar = GrammarCompiler(self.tokenizer, self.args.vocab_size, stops)
        return self._grammar
