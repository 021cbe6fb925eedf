"""The training loop: `train(config)` trains, evaluates, checkpoints, resumes and exports.

One optimizer step reads `batch_size * grad_accum * world_size` windows (data.BatchOrder) and
minimises the mean cross-entropy over every target token of that global mini-batch: each micro-batch
adds `sum of its token losses * world_size / (targets in the global batch)` to the gradient, and DDP
averages over processes, so `param.grad` is exactly the mean gradient of the mini-batch whatever the
split into processes and micro-steps. The `sgd` optimizer then is Nielsen's
`w - (eta / len(mini_batch)) * sum nabla_w`.

A step whose loss or gradient norm is NaN or infinite stops the run (TrainingDiverged) before the
weights change; the latest checkpoint (written atomically, see state.py) is the last good one.
Resuming restores weights, optimizer, RNG and the step, and since the batches depend only on the
step, the losses equal those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from llamaforge import devices
from llamaforge.errors import ChatFormatError, ConfigError
from llamaforge.training import distributed as dist_utils
from llamaforge.training.config import TrainConfig
from llamaforge.training.corpus import prepare_data
from llamaforge.training.data import IGNORE_INDEX, BatchOrder, PackedDataset, TokenFile
from llamaforge.training.lora import apply_lora
from llamaforge.training.modeling import (
    Source, enable_activation_checkpointing, export_model, full_state_dict, load_for_training, quantized_base,
    scratch_model,
)
from llamaforge.training.monitor import RunLog, plot_losses
from llamaforge.training.optim import build_optimizer, lr_at, set_lr
from llamaforge.training.preference import PreferenceObjective, load_pairs
from llamaforge.training.state import (
    STATE_FILE, STATE_VERSION, TrainingDiverged, TrainingError, load_state, rng_state, save_state, set_rng_state,
)


@dataclass
class TrainResult:
    """What a call to `train` did.

    Attributes:
        out_dir: the run folder (checkpoint.pt, log.jsonl, loss.png, model/).
        start_step, step: the step this call started from (> 0 when resumed) and reached.
        losses: training loss of each step this call ran, in order.
        val_losses: validation loss by step (step 0 is before any training).
        val_metrics: preference runs: reward_accuracy and preference_accuracy by step (preference.py).
        tokens_per_s: mean training throughput of this call (all processes together).
        exported: the path `Llama.build` loads, when the run finished and exported.
        adapter: a LoRA run's adapters alone when it finished: a PEFT folder (`out_dir/adapter`, beside it
            `out_dir/adapter.gguf` in llama.cpp's GGUF LoRA format); `Llama.build(base, adapters=[...])`.
        samples: generated samples by step, when `sample_every` is set.
    """

    out_dir: Path
    start_step: int
    step: int
    losses: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    val_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    exported: Optional[Path] = None
    adapter: Optional[Path] = None
    samples: dict[int, list[str]] = field(default_factory=dict)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over the targets that count: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def train(config: TrainConfig, *, stop_after: Optional[int] = None) -> TrainResult:
    """Run (or resume) the training `config` describes; see the module docstring.

    Args:
        config: the run's settings.
        stop_after: stop (with a checkpoint) once this many steps are done, before `max_steps`; the
            schedule still follows `max_steps`, so a later call resumes the same run.

    Returns:
        TrainResult.

    Raises:
        TrainingDiverged: the loss became NaN/inf (the last good checkpoint is kept).
        ConfigError, CheckpointError, TrainingError: bad settings, data, or a checkpoint of another run.
    """
    device = devices.resolve_device(config.device)
    info = dist_utils.setup(device)
    try:
        return _Run(config, info, device).run(stop_after)
    finally:
        dist_utils.teardown(info)


class _Run:
    def __init__(self, cfg: TrainConfig, info: dist_utils.DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        self.out = cfg.out_path
        torch.manual_seed(cfg.seed)
        if cfg.model is not None:
            model, self.tokenizer, self.source = load_for_training(
                cfg.model, cfg.tokenizer, device, cfg.seq_len, progress=cfg.progress and info.is_main,
                quantize=cfg.quantize)
        else:
            from llamaforge.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.from_file(cfg.tokenizer)
            model = scratch_model(cfg.model_args or {}, self.tokenizer, device, cfg.init_std, cfg.seq_len)
            self.source = Source("scratch", Path(cfg.tokenizer), None)
        self.args = model.args
        if cfg.seq_len > self.args.max_seq_len:
            raise ConfigError(f"seq_len={cfg.seq_len} is longer than the model's max_seq_len={self.args.max_seq_len}")
        self.pref: Optional[PreferenceObjective] = None
        self._prepare_data()
        if cfg.lora is not None:
            apply_lora(model, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
        self.quantized = quantized_base(model) > 0
        if cfg.activation_checkpointing or (cfg.activation_checkpointing is None and self.quantized):
            enable_activation_checkpointing(model)
        self.model = dist_utils.wrap(model, info, device, cfg.fsdp)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.lr, weight_decay=cfg.weight_decay,
                                         momentum=cfg.momentum, betas=cfg.betas)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.pref is not None:  # DPO's reference: the model as the run starts, before any resume
            self.pref.prepare(self.model, cfg.batch_size, device, self._autocast)
        self.order = BatchOrder(len(self.train_ds), cfg.batch_size, cfg.grad_accum, info.world_size, cfg.seed)
        self.log = RunLog(None)  # opened by run(): appended to when resuming, started afresh otherwise
        self.step = 0

    # -- setup ------------------------------------------------------------------------------------------

    def _prepare_data(self) -> None:
        from llamaforge.chat import chat_format_for

        cfg = self.cfg
        try:
            chat_format = chat_format_for(self.tokenizer)
        except ChatFormatError:
            chat_format = None
        if cfg.preference is not None:
            train_pairs, val_pairs, self.data_fingerprint = load_pairs(
                cfg.data, self.tokenizer, chat_format, cfg.seq_len, val_fraction=cfg.val_fraction, seed=cfg.seed,
                val_sources=cfg.val_data)
            pc = cfg.preference
            self.pref = PreferenceObjective(pc.loss, pc.beta, pc.gamma, train_pairs, val_pairs)
            self.train_ds, self.val_ds = train_pairs, val_pairs
            return
        data_dir = Path(cfg.data_dir) if cfg.data_dir else self.out / "data"
        kwargs = dict(val_fraction=cfg.val_fraction, seed=cfg.seed, chat_format=chat_format,
                      vocab_size=self.args.vocab_size, val_sources=cfg.val_data)
        if self.info.is_main:
            prepared = prepare_data(cfg.data, self.tokenizer, data_dir, **kwargs)
        dist_utils.barrier(self.info)
        if not self.info.is_main:
            prepared = prepare_data(cfg.data, self.tokenizer, data_dir, **kwargs)  # reuses rank 0's files
        self.data_fingerprint = (data_dir / "prepared.json").read_text()
        self.train_ds = PackedDataset(TokenFile.open(prepared.train_stem), cfg.seq_len, "training")
        self.val_ds = PackedDataset(TokenFile.open(prepared.val_stem), cfg.seq_len, "validation") \
            if prepared.val_stem is not None else None

    def _autocast(self) -> Any:
        if self.cfg.autocast == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- checkpoints --------------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.out / STATE_FILE

    def _save(self) -> None:
        lora = self.cfg.lora is not None
        model_sd = dist_utils.model_state(self.model, trainable_only=lora)
        optim_sd = dist_utils.optimizer_state(self.model, self.optimizer)
        if self.info.is_main:
            save_state(self.state_path, {
                "version": STATE_VERSION, "step": self.step, "model": model_sd, "optimizer": optim_sd,
                "rng": rng_state(), "config": self.cfg.to_dict(), "model_args": self.args.to_dict(),
                "data": self.data_fingerprint, "global_batch": self.order.global_batch,
            })
            self.log.write(step=self.step, event="checkpoint", path=str(self.state_path))
        dist_utils.barrier(self.info)

    def _resume(self) -> None:
        state = load_state(self.state_path)
        if state["model_args"] != self.args.to_dict():
            raise TrainingError(f"{self.state_path} holds a model of another shape; use a new out_dir or "
                                "set resume = false to start over")
        if state["data"] != self.data_fingerprint or state["global_batch"] != self.order.global_batch:
            raise TrainingError(
                f"{self.state_path} was written with other data or another global batch "
                f"({state['global_batch']} windows per step, now {self.order.global_batch}); resuming would not "
                "continue the same run. Use the same data and batch_size * grad_accum * processes, or a new out_dir")
        dist_utils.load_model_state(self.model, state["model"], strict=self.cfg.lora is None)
        dist_utils.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.log.write(step=self.step, event="resumed", path=str(self.state_path))

    # -- evaluation and samples ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean validation loss over evenly spaced windows (the same ones every time); preference runs
        score every validation pair and keep their accuracies in `self.eval_metrics`."""
        if self.val_ds is None:
            return None
        if self.pref is not None:
            self.model.eval()
            metrics = self.pref.evaluate(self.model, self.cfg.batch_size, self.device, self._autocast)
            self.model.train()
            self.eval_metrics = {k: v for k, v in metrics.items() if k != "loss"}
            return metrics["loss"]
        cfg, world = self.cfg, self.info.world_size
        # The same windows whatever the number of processes (rounded up so that each process runs as
        # many forward passes as the others, which FSDP needs).
        wanted = min(len(self.val_ds), cfg.eval_batches * cfg.batch_size)
        per_rank = -(-wanted // world)
        picks = np.linspace(0, len(self.val_ds) - 1, per_rank * world).round().astype(np.int64)
        mine = picks[self.info.rank::world]
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.model.eval()
        for i in range(0, len(mine), cfg.batch_size):
            x, y = self.val_ds.batch(mine[i:i + cfg.batch_size])
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = self.model(x)
            total[0] += token_loss_sum(logits, y).double()
            total[1] += (y != IGNORE_INDEX).sum()
        self.model.train()
        dist_utils.all_reduce_sum(total, self.info)
        return float(total[0] / total[1].clamp(min=1))

    def samples(self) -> list[str]:
        """Continuations of `sample_prompts` by the model as it is now (rank 0, not under FSDP)."""
        from llamaforge.generation import SamplingParams, generate

        if not self.info.is_main or self.cfg.fsdp or not self.cfg.sample_prompts:
            return []
        tok = self.tokenizer
        model = dist_utils.unwrap(self.model)
        texts = []
        model.eval()
        for prompt in self.cfg.sample_prompts:
            ids = tok.encode(prompt, bos=tok.add_bos and tok.bos_id is not None)
            if not ids:
                continue
            gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
            params = SamplingParams(temperature=self.cfg.sample_temperature, top_p=0.95)
            out, _ = generate(model, [ids], max_gen_len=self.cfg.sample_tokens, max_seq_len=self.args.max_seq_len,
                              params=params, stop_ids=tok.stop_ids, device=self.device, generator=gen)
            texts.append(prompt + tok.decode(out[0]))
        model.train()
        return texts

    # -- the loop -----------------------------------------------------------------------------------------

    def _train_step(self) -> tuple[float, float]:
        """One optimizer step; returns (mean loss over the global mini-batch, gradient norm)."""
        cfg, info = self.cfg, self.info
        windows = self.order.step_windows(self.step)
        if self.pref is not None:  # the mean over pairs
            n_targets = len(windows)
            self.step_tokens = self.train_ds.n_tokens(windows)
        else:
            n_targets = max(1, self.train_ds.n_targets(windows))
        scale = info.world_size / n_targets
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(cfg.grad_accum):
            batch = self.order.micro_batch(self.step, info.rank, micro)
            with dist_utils.no_sync(self.model, skip=micro < cfg.grad_accum - 1):
                if self.pref is not None:
                    summed = self.pref.loss_sum(self.model, batch, self.device, self._autocast)
                else:
                    x, y = self.train_ds.batch(batch)
                    with self._autocast():
                        logits = self.model(x.to(self.device))  # (B, T, V) float32
                    summed = token_loss_sum(logits, y.to(self.device))
                (summed * scale).backward()
            loss_sum += summed.detach().double()
        dist_utils.all_reduce_sum(loss_sum, info)
        loss = float(loss_sum) / n_targets
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._diverged(loss, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm

    def _diverged(self, loss: float, norm: float) -> None:
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm} (loss {loss:.4f})"
        lr = self.optimizer.param_groups[0]["lr"]
        if self.state_path.is_file():
            kept = f"the last good checkpoint, {self.state_path} (step {load_state(self.state_path)['step']}), is kept"
        else:
            kept = "no checkpoint had been written yet (set save_every lower to keep one)"
        self.log.write(step=self.step + 1, event="diverged", detail=what)
        self._plot()
        raise TrainingDiverged(
            f"training diverged at step {self.step + 1}: {what} at lr {lr:.3g}; the weights were not updated with "
            f"it and {kept}. Resume with a lower lr, more warmup_steps or grad_clip > 0, or check the data."
        )

    def _plot(self) -> None:
        if self.info.is_main and self.cfg.plot:
            plot_losses(self.out / "log.jsonl", self.out / "loss.png", title=self.out.name)

    def _validate(self, result: TrainResult) -> None:
        val = self.evaluate()
        if val is not None:
            result.val_losses[self.step] = val
            if self.pref is not None:
                result.val_metrics[self.step] = dict(self.eval_metrics)
                self.log.write(step=self.step, val_loss=val, **self.eval_metrics)
            else:
                self.log.write(step=self.step, val_loss=val, val_ppl=math.exp(min(val, 50)))
            if self.bar is not None and self.pref is not None:
                self.bar.write(f"step {self.step}: validation loss {val:.4f}, "
                               + ", ".join(f"{k} {v:.3f}" for k, v in self.eval_metrics.items()))
            elif self.bar is not None:
                self.bar.write(f"step {self.step}: validation loss {val:.4f}, perplexity {math.exp(min(val, 50)):.2f}")
        self._plot()

    def _sample(self, result: TrainResult) -> None:
        texts = self.samples()
        if texts:
            result.samples[self.step] = texts
            self.log.write(step=self.step, samples=texts)
            if self.bar is not None:
                for t in texts:
                    self.bar.write(f"step {self.step} sample: {t!r}")

    def run(self, stop_after: Optional[int]) -> TrainResult:
        cfg, info = self.cfg, self.info
        resuming = cfg.resume and self.state_path.is_file()
        self.log = RunLog(self.out / "log.jsonl" if info.is_main else None, fresh=not resuming)
        if resuming:
            self._resume()
        end = cfg.max_steps if stop_after is None else min(cfg.max_steps, stop_after)
        result = TrainResult(self.out, self.step, self.step)
        self.bar = None
        if info.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not cfg.progress, unit="step",
                            dynamic_ncols=True, desc="train")
        self.log.write(step=self.step, event="start", world_size=info.world_size, n_params=self.args.n_params,
                       trainable=sum(p.numel() for p in self.params), train_windows=len(self.train_ds))
        if self.step == 0 and cfg.eval_every:
            self._validate(result)
        if self.step == 0 and cfg.sample_every:
            self._sample(result)
        tokens_per_step = self.order.global_batch * cfg.seq_len
        run_time, run_tokens = 0.0, 0
        try:
            while self.step < end:
                t0 = time.perf_counter()
                lr = lr_at(self.step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                           min_lr=cfg.min_lr, schedule=cfg.schedule)
                set_lr(self.optimizer, lr)
                loss, norm = self._train_step()
                self.step += 1
                dt = time.perf_counter() - t0
                run_time += dt
                result.losses.append(loss)
                step_tokens = self.step_tokens if self.pref is not None else tokens_per_step
                run_tokens += step_tokens
                tps = step_tokens / dt
                if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == end):
                    self.log.write(step=self.step, loss=loss, lr=lr, grad_norm=norm, tokens_per_s=tps,
                                   epoch=self.order.epoch_of(self.step))
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
                    self.bar.update(1)
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == end):
                    self._validate(result)
                if cfg.sample_every and (self.step % cfg.sample_every == 0 or self.step == end):
                    self._sample(result)
                if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == end:
                    self._save()
        finally:
            if self.bar is not None:
                self.bar.close()
        result.step = self.step
        result.tokens_per_s = run_tokens / run_time if run_time else 0.0
        if self.step >= cfg.max_steps and cfg.lora is not None:
            result.adapter = self._save_adapter()
        if self.step >= cfg.max_steps and cfg.export != "none":
            result.exported = self._export()
        self._plot()
        self.log.write(step=self.step, event="end", tokens_per_s=result.tokens_per_s,
                       exported=str(result.exported) if result.exported else None)
        self.log.close()
        return result

    def _save_adapter(self) -> Optional[Path]:
        from llamaforge.checkpoints.adapters import save_gguf_lora, save_peft
        from llamaforge.training.adapters import adapter_from_state_dict

        lora = self.cfg.lora
        state = dist_utils.model_state(self.model, trainable_only=True)  # collective under FSDP
        path = None
        if self.info.is_main:
            adapter = adapter_from_state_dict(state, lora.alpha)
            path = save_peft(adapter, self.args, self.out / "adapter", dropout=lora.dropout, base_model=self.cfg.model)
            save_gguf_lora(adapter, self.args, self.out / "adapter.gguf")
            self.log.write(step=self.step, event="adapter", path=str(path))
        dist_utils.barrier(self.info)
        return path

    def _export(self) -> Optional[Path]:
        full = dist_utils.model_state(self.model, trainable_only=False)  # collective under FSDP
        if self.quantized:
            full = full_state_dict(dist_utils.unwrap(self.model), full)
        path = None
        if self.info.is_main:
            alpha = self.cfg.lora.alpha if self.cfg.lora is not None else None
            path = export_model(self.args, full, self.source, self.out / "model", self.cfg.export,
                                self.cfg.export_dtype, lora_alpha=alpha)
        dist_utils.barrier(self.info)
        return path
