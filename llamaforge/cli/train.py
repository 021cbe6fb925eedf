"""`llamaforge train`: pretrain or fine-tune a model from a TOML config and/or flags.

    llamaforge train run.toml
    llamaforge train run.toml --max-steps 50 --set lora.rank=4
    torchrun --nproc_per_node 2 -m llamaforge.cli.main train run.toml      # DDP (gloo on CPU)

Flags override the file; `--set KEY=VALUE` sets any TrainConfig field (dotted for tables:
`model_args.dim=128`, `lora.rank=8`), VALUE written as in TOML (strings may omit quotes).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

# flags that set the TrainConfig field of the same name
_FLAGS = ("data", "model", "tokenizer", "out_dir", "optimizer", "lr", "max_steps", "warmup_steps", "batch_size",
          "grad_accum", "seq_len", "device", "autocast", "eval_every", "save_every", "export", "seed",
          "activation_checkpointing", "fsdp", "resume", "progress")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain or fine-tune a model (SGD, AdamW, LoRA)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None, help="TOML file with the run's settings")
    p.add_argument("--data", nargs="+", default=None, help="text / JSONL files or folders")
    p.add_argument("--model", default=None, help="checkpoint to fine-tune ('default': the default model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model for a model trained from scratch")
    p.add_argument("--out-dir", "--out_dir", dest="out_dir", default=None, help="run folder (checkpoints, logs, model)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None, help="sgd or adamw (default: the config's, else adamw)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=None, help="optimizer steps in all")
    p.add_argument("--warmup-steps", "--warmup_steps", dest="warmup_steps", type=int, default=None,
                   help="steps of linear learning-rate warmup")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="windows per micro-batch")
    p.add_argument("--grad-accum", dest="grad_accum", type=int, default=None, help="micro-batches per step")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=None, help="tokens per training window")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, mps")
    p.add_argument("--autocast", choices=["none", "bf16"], default=None, help="bf16 mixed precision")
    p.add_argument("--eval-every", "--eval_every", dest="eval_every", type=int, default=None,
                   help="steps between validation losses and samples")
    p.add_argument("--save-every", "--save_every", dest="save_every", type=int, default=None,
                   help="steps between checkpoints")
    p.add_argument("--export", choices=["auto", "meta", "hf", "gguf", "none"], default=None,
                   help="format of the model written at the end (auto: the source's)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the run")
    p.add_argument("--lora-rank", dest="lora_rank", type=int, default=None, help="fine-tune with LoRA of this rank")
    p.add_argument("--lora-targets", dest="lora_targets", default=None, help="comma-separated, e.g. wq,wv")
    p.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass (less memory, more time)")
    p.add_argument("--fsdp", action="store_true", default=None, help="shard the model (under torchrun)")
    p.add_argument("--no-resume", dest="resume", action="store_false", default=None, help="start over")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.add_argument("--stop-after", dest="stop_after", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps; run again to resume")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting, e.g. model_args.dim=128 or lora.alpha=32 (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.set_defaults(run=run)


def parse_value(text: str) -> Any:
    """A TOML value (number, bool, string, array, inline table), or the text itself as a string."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig values the flags set."""
    out: dict[str, Any] = {}
    for flag in _FLAGS:
        if getattr(args, flag) is not None:
            out[flag] = getattr(args, flag)
    if args.lora_rank is not None or args.lora_targets is not None:
        lora = out.setdefault("lora", {})
        if args.lora_rank is not None:
            lora["rank"] = args.lora_rank
            lora.setdefault("alpha", 2.0 * args.lora_rank)
        if args.lora_targets is not None:
            lora["targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set takes KEY=VALUE, got {item!r}")
        *tables, leaf = key.strip().split(".")
        target = out
        for t in tables:
            target = target.setdefault(t, {})
        target[leaf] = parse_value(value.strip())
    return out


def run(args: argparse.Namespace) -> int:
    from llamaforge.training import TrainConfig, train

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    overrides = overrides_from(args)
    if args.config:
        base = TrainConfig.from_toml(args.config).to_dict()
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key].update(value)
            else:
                base[key] = value
        config = TrainConfig.from_dict(base)
    else:
        config = TrainConfig.from_dict(overrides)
    result = train(config, stop_after=args.stop_after)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.start_step == result.step >= config.max_steps:
        print(f"{result.out_dir} already finished its {config.max_steps} steps; nothing to train. Raise --max-steps to "
              f"go on, or pass --no-resume to start over")
        if result.exported:
            print(f"model: {result.exported}")
        return 0
    first = result.val_losses.get(min(result.val_losses)) if result.val_losses else None
    last = result.val_losses.get(max(result.val_losses)) if result.val_losses else None
    print(f"trained steps {result.start_step} -> {result.step} at {result.tokens_per_s:,.0f} tokens/s")
    if first is not None:
        print(f"validation loss {first:.4f} (step {min(result.val_losses)}) -> {last:.4f} (step {max(result.val_losses)})")
    print(f"run folder: {result.out_dir} (log.jsonl, loss.png, checkpoint.pt)")
    if result.exported:
        print(f"model: {result.exported}   try: llamaforge generate {result.exported} -p 'Once upon a time'")
    elif result.step < config.max_steps:
        print(f"stopped at step {result.step} of {config.max_steps}; run the same command again to resume")
    sys.stdout.flush()
    return 0
