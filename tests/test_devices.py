"""Device policy, and the same results on every available device (CUDA/MPS tests skip without one).

Tolerance on accelerators in float32: greedy tokens identical to the CPU's, logprobs within 1e-3
(different kernels and summation orders).
"""

import pytest
import torch

from llamaforge import Llama, devices
from llamaforge.errors import DeviceError

ACCELERATORS = [
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
    pytest.param("mps", marks=pytest.mark.skipif(not devices.mps_available(), reason="needs Apple MPS")),
]


def test_auto_prefers_cuda_then_mps_then_cpu():
    dev = devices.resolve_device("auto")
    if torch.cuda.is_available():
        assert dev.type == "cuda"
    elif devices.mps_available():
        assert dev.type == "mps"
    else:
        assert dev == torch.device("cpu")


def test_default_dtypes_per_device():
    assert devices.default_dtype(torch.device("cpu")) == torch.float32
    assert devices.default_dtype(torch.device("mps")) == torch.float16
    assert devices.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert devices.resolve_dtype(None, torch.device("cpu")) == torch.float32
    with pytest.raises(DeviceError, match="unsupported dtype"):
        devices.resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(DeviceError, match="unknown device"):
        devices.resolve_device("tpu:0:x")


def test_distributed_backend_follows_the_device():
    assert devices.distributed_backend(torch.device("cuda", 0)) == "nccl"
    assert devices.distributed_backend(torch.device("cpu")) == "gloo"


def test_one_process_never_starts_torch_distributed(tiny_checkpoints):
    import torch.distributed as dist

    Llama.build(tiny_checkpoints.meta_mp2, max_seq_len=32, device="cpu")
    assert not dist.is_initialized()


@pytest.mark.parametrize("device", ACCELERATORS)
def test_accelerator_matches_cpu(tiny_checkpoints, device):
    cpu = Llama.build(tiny_checkpoints.meta, max_seq_len=64, device="cpu")
    acc = Llama.build(tiny_checkpoints.meta, max_seq_len=64, device=device, dtype="float32")
    tokens = [cpu.tokenizer.encode(p, bos=True) for p in ["hello world", "the llama model is"]]
    a = cpu.generate(tokens, 12, temperature=0, logprobs=True)
    b = acc.generate(tokens, 12, temperature=0, logprobs=True)
    assert a[0] == b[0]
    for x, y in zip(a[1], b[1]):
        assert x == pytest.approx(y, abs=1e-3)
    # the device's default dtype (bf16 on CUDA, fp16 on MPS) runs and returns the same structure
    half = Llama.build(tiny_checkpoints.meta, max_seq_len=64, device=device)
    out = half.text_completion(["hello world"], temperature=0, max_gen_len=5, logprobs=True)
    assert len(out[0]["tokens"]) == len(out[0]["logprobs"])


@pytest.mark.parametrize("device", ACCELERATORS)
def test_default_model_on_accelerator(device):
    gen = Llama.build(max_seq_len=256, device=device)
    answer = gen.chat_completion([[{"role": "user", "content": "What is the capital of France?"}]],
                                 temperature=0, max_gen_len=24)[0]["generation"]["content"]
    assert "Paris" in answer
