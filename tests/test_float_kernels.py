"""The C++ kernels' plain-float weight matmul (F32 / F16 / BF16 weights, float32 activations).

Reference: float64 `x @ W.T` of the same (exactly converted) weights; float32 sums of K products agree to
1e-5 relative. Tiles of 4 weight rows x 2 activation rows keep one accumulator per (row, activation)
pair summed in the same order as a lone row, so results must be bit for bit independent of the batch
and of which weight rows share a tile (exact equality). No test asserts on time.
"""

from __future__ import annotations

import pytest
import torch

from llamaforge import kernels

ext = kernels.get_extension()
pytestmark = pytest.mark.skipif(ext is None, reason="the C++ kernels are not available here")
TYPES = {"F32": (0, torch.float32), "F16": (1, torch.float16), "BF16": (30, torch.bfloat16)}
REL_TOL = 1e-5


def linear(x: torch.Tensor, w: torch.Tensor, qt: str) -> torch.Tensor:
    n, k = w.shape
    return ext.qlinear(x, w, TYPES[qt][0], n, k, None, 0, 0)


@pytest.mark.parametrize("qt", list(TYPES))
@pytest.mark.parametrize("n,k", [(1, 8), (3, 37), (4, 64), (13, 72), (21, 200)])
@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_float_weights_match_float64(qt, n, k, m):
    g = torch.Generator().manual_seed(n * 1000 + k * 10 + m)
    w = torch.randn(n, k, generator=g).to(TYPES[qt][1])
    x = torch.randn(m, k, generator=g)
    got = linear(x, w, qt)
    want = (x.double() @ w.double().T).float()
    assert got.shape == (m, n)
    assert ((got - want).norm() / want.norm()).item() < REL_TOL


@pytest.mark.parametrize("qt", list(TYPES))
def test_a_result_does_not_depend_on_its_batch_or_tile(qt):
    g = torch.Generator().manual_seed(3)
    n, k = 11, 136  # two tiles of 4 rows and 3 rows alone; k with a tail past the last 8
    w = torch.randn(n, k, generator=g).to(TYPES[qt][1])
    x = torch.randn(7, k, generator=g)
    full = linear(x, w, qt)
    for m in range(7):
        assert torch.equal(linear(x[m : m + 1], w, qt), full[m : m + 1])
    for j in range(n):  # row j alone (no tile) against its place inside a 4-row tile
        assert torch.equal(linear(x, w[j : j + 1].contiguous(), qt)[:, 0], full[:, j])
