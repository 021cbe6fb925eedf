"""LoRA adapters served over one base model, chosen per batch row (as punica / S-LoRA serve many adapters).

An `AdapterTable` belongs to one model. `add(name, path)` reads a LoRA adapter (a PEFT folder or a GGUF LoRA
file, through the one reader `checkpoints.adapters.read_adapter`) and wraps
each projection it adapts in a `RowLoRA`; a forward run inside `table.rows(adapters)` then adds, to the rows
of adapter i only, `scale_i * (x @ A_i^T) @ B_i^T` (Hu et al. 2021), so requests with different adapters
(and none) can share one forward. Outside `rows()`, and for rows without an adapter, a `RowLoRA` is its base layer
exactly. On the CPU in float32 the deltas come from one C++ kernel (kernels/qlora.h, `ServedAdapter.native`),
which the fused C++ decode step (runtime/fused.py) calls too, so decode steps of mixed batches stay fused and
add exactly what the modules would; elsewhere (GPU, other dtypes, autograd) from `torch.bmm`.

Batch invariance: the base layer is unchanged, and the C++ kernel computes each token row's delta in a fixed
order, whatever other rows run and however a row is padded, so adapted prompt chunks share the engine's
batched prefill. (`torch.bmm`, one product per row, is the same for a row with the same number of tokens.)

Every loaded adapter gets a `key` never used again (a re-added name gets a new one), which the engine's
prefix cache uses to keep keys and values computed with one adapter away from requests of another.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from llamaforge.checkpoints.adapters import read_adapter
from llamaforge.errors import CheckpointError, ConfigError
from llamaforge.kernels import get_extension
from llamaforge.model import ModelArgs

PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # a layer's projections, in the C++ kernels' order


@dataclass(eq=False)
class ServedAdapter:
    """One loaded adapter: {Meta module name: (A (r, in), B (out, r))} in the model's dtype, and its scale.

    native: the C++ kernels' `LoraAdapter` of the same tensors (float32 CPU models), else None."""

    name: str
    key: int
    weights: "LoRAWeights"
    scaling: float
    rank: int
    source: str
    native: Any = field(default=None, repr=False)


LoRAWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # Meta module name -> (A (r, in), B (out, r))


def read_served(path: Union[str, Path], args: ModelArgs) -> tuple[LoRAWeights, float, int]:
    """An adapter file (`checkpoints.adapters.read_adapter`: PEFT folder or GGUF LoRA) -> ({Meta module: (A, B)}
    float32 in Meta's row order, scaling, rank); only the blocks' projections can be served.

    Raises:
        CheckpointError: no LoRA adapter for this model's shapes, or one that adapts another module.
    """
    adapter = read_adapter(path, args)
    for meta in adapter.weights:
        if meta.rsplit(".", 1)[-1] not in PROJECTIONS or not meta.startswith("layers."):
            raise CheckpointError(f"{path} adapts {meta}; served adapters may adapt the blocks' projections only "
                                  f"({', '.join(PROJECTIONS)}): merge it into the model instead (Llama.build(adapters=))")
    return adapter.weights, adapter.scaling, adapter.rank


class RowLoRA(nn.Module):
    """`base(x)` plus, for the rows of each adapter active in this forward, that adapter's LoRA delta."""

    def __init__(self, base: nn.Module, name: str, table: "AdapterTable"):
        super().__init__()
        self.base = base
        self.name = name
        self._table = table  # a plain object: not a submodule, not in the state dict
        _, layer, _, leaf = name.split(".")  # "layers.N.attention.wq"
        self._at = (int(layer), PROJECTIONS.index(leaf))  # where the C++ adapters hold this projection's pair

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        native = self._table.native
        if native is not None and x.dim() == 3 and x.dtype == out.dtype == torch.float32 \
                and x.device.type == "cpu" and out.is_contiguous() and not torch.is_grad_enabled():
            get_extension().lora_add_(out, x.contiguous(), *native, *self._at)  # (B, T, out) in place
            return out
        for rows, adapter in self._table.active:
            ab = adapter.weights.get(self.name)
            if ab is None:
                continue
            a, b = ab
            xs = x[rows]  # (n, T, in): the rows of this adapter
            n = xs.shape[0]
            h = torch.bmm(xs.to(a.dtype), a.t().unsqueeze(0).expand(n, -1, -1))  # (n, T, r)
            delta = torch.bmm(h, b.t().unsqueeze(0).expand(n, -1, -1)) * adapter.scaling  # (n, T, out)
            out[rows] += delta.to(out.dtype)
        return out


class AdapterTable:
    """The LoRA adapters loaded over one model, by name; thread-safe `add` / `remove` / `get`.

    `lock` is held by the engine around each forward, so an adapter is never added in the middle of one.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.lock = threading.RLock()
        self._adapters: dict[str, ServedAdapter] = {}
        self._next_key = 1
        self.active: list[tuple[torch.Tensor, ServedAdapter]] = []  # during `rows()`: (row indices, adapter)
        # during `rows()`, if every active adapter has C++ tensors: ([their LoraAdapter], per row index or -1 (B,))
        self.native: Optional[tuple[list, torch.Tensor]] = None

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self._adapters)

    def get(self, name: str) -> ServedAdapter:
        """The adapter called `name`; ConfigError naming the loaded ones if there is none."""
        with self.lock:
            adapter = self._adapters.get(name)
            if adapter is None:
                raise ConfigError(f"no LoRA adapter {name!r} is loaded; loaded: {sorted(self._adapters) or 'none'}")
            return adapter

    def add(self, name: str, path: Union[str, Path]) -> ServedAdapter:
        """Load the PEFT adapter at `path` as `name` (replacing one of that name); returns it.

        Raises:
            CheckpointError: the folder is no PEFT LoRA adapter for this model.
            ConfigError: an empty name, or a projection that cannot take an adapter.
        """
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"an adapter needs a non-empty name, got {name!r}")
        weights, scaling, rank = read_served(path, self.model.args)
        ref = self.model.norm.weight
        weights = {k: (a.to(ref.device, ref.dtype), b.to(ref.device, ref.dtype)) for k, (a, b) in weights.items()}
        with self.lock:
            for module_name in weights:
                self._wrap(module_name)
            adapter = ServedAdapter(name, self._next_key, weights, scaling, rank, str(path),
                                    _native(weights, scaling, self.model.args.n_layers))
            self._next_key += 1
            self._adapters[name] = adapter
            return adapter

    def remove(self, name: str) -> None:
        """Unload `name` (running requests with it finish with it); ConfigError if it is not loaded."""
        with self.lock:
            self.get(name)
            del self._adapters[name]

    @contextlib.contextmanager
    def rows(self, adapters: Sequence[Optional[ServedAdapter]]) -> Iterator[None]:
        """Within: batch row i of a forward gets `adapters[i]`'s delta (None: the base model alone)."""
        groups: dict[int, list[int]] = {}
        by_key = {}
        for i, adapter in enumerate(adapters):
            if adapter is not None:
                groups.setdefault(adapter.key, []).append(i)
                by_key[adapter.key] = adapter
        with self.lock:
            device = self.model.norm.weight.device
            self.active = [(torch.tensor(rows, device=device), by_key[key]) for key, rows in groups.items()]
            if self.active and all(by_key[key].native is not None for key in groups):
                ids = torch.full((len(adapters),), -1, dtype=torch.long)
                for j, key in enumerate(groups):
                    ids[groups[key]] = j
                self.native = ([by_key[key].native for key in groups], ids)
            try:
                yield
            finally:
                self.active, self.native = [], None

    def _wrap(self, module_name: str) -> None:
        parent_name, _, leaf = module_name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        current = getattr(parent, leaf)
        if isinstance(current, RowLoRA):
            return
        if not hasattr(current, "in_features") or not hasattr(current, "out_features"):
            raise ConfigError(f"{module_name} is a {type(current).__name__}, which cannot take a LoRA adapter")
        setattr(parent, leaf, RowLoRA(current, module_name, self))


def _native(weights: LoRAWeights, scaling: float, n_layers: int) -> Any:
    """The C++ `LoraAdapter` of these weights if they are float32 CPU tensors and the kernels are here, else None.

    A pair whose values are all bfloat16 (or float16) numbers, as in adapters saved in those dtypes, is held in
    that dtype: the kernel reads half the bytes each step and computes with the same float32 values."""
    ext = get_extension()
    if ext is None or any(t.dtype != torch.float32 or t.device.type != "cpu" for ab in weights.values() for t in ab):
        return None
    layers: list[list] = [[None] * len(PROJECTIONS) for _ in range(n_layers)]
    for name, ab in weights.items():
        _, layer, _, leaf = name.split(".")  # "layers.N.attention.wq"
        layers[int(layer)][PROJECTIONS.index(leaf)] = _compact(*ab)
    return ext.LoraAdapter(layers, scaling)


def _compact(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) in bfloat16 or float16 where that dtype holds their values exactly, else as they are."""
    for dtype in (torch.bfloat16, torch.float16):
        a16, b16 = a.to(dtype), b.to(dtype)
        if torch.equal(a16.float(), a) and torch.equal(b16.float(), b):
            return a16, b16
    return a, b
