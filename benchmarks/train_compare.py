"""LoRA / QLoRA fine-tuning side by side: llamaforge vs Hugging Face transformers + PEFT, on the CPU.

Same model (the default model's weights, dequantized once to float32 and saved in Hugging Face's layout
for the peer), same batches (windows of `--seq-len` tokens cut from one text, in the same order), same
settings (LoRA rank 8, alpha 16 on q and v, AdamW lr 2e-4, no weight decay, gradient clipping at 1,
`--batch` windows per step, `--threads` threads). Each variant runs in its own process, so that peak RSS
(getrusage ru_maxrss) is its own. Reported: tokens/s over the steps after the first (which warms up),
peak RSS, and the loss of every step (the loss after N steps is the last).

llamaforge runs the training loop's own pieces (load_for_training, apply_lora, the activation
checkpointing and autocast of TrainConfig, token_loss_sum, AdamW), without the loop's data preparation,
evaluation and checkpoints. Variants:

    lf-lora        float32 base, fused LoRA Function
    lf-lora-plain  the same with plain-autograd LoRA (y = base(x) + s * B(A(x))): what the fusion buys
    lf-lora-bf16   float32 base and adapters, bf16 autocast (matmuls in bfloat16 on AVX512-BF16 / AMX CPUs)
    lf-qlora-q4_0  base quantized to Q4_0 on load, exact dequantize-on-the-fly path, activation checkpointing
    lf-qlora-gguf  the GGUF file's own quantized weights (Q4_1 for the default model), as above
    hf-peft        transformers LlamaForCausalLM + peft LoraConfig(r=8, lora_alpha=16, q_proj, v_proj)

    python benchmarks/train_compare.py                      # all variants, 20 steps of 4 x 128 tokens
    python benchmarks/train_compare.py --steps 200 --variants lf-lora,lf-qlora-q4_0,hf-peft   # loss curves
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("lf-lora", "lf-lora-plain", "lf-lora-bf16", "lf-qlora-q4_0", "lf-qlora-gguf", "hf-peft")


def batches(tokenizer, seq_len: int, batch: int, steps: int):
    """`steps` batches of (batch, seq_len + 1) token windows from the repository's README (repeated)."""
    import torch

    text = (ROOT / "README.md").read_text()
    ids = tokenizer.encode(text, bos=False)
    need = steps * batch * (seq_len + 1)
    ids = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor(ids).view(steps, batch, seq_len + 1)


def run_llamaforge(variant: str, args) -> dict:
    import torch

    from llamaforge.training.loop import token_loss_sum
    from llamaforge.training.lora import LoRALinear, apply_lora
    from llamaforge.training.modeling import enable_activation_checkpointing, load_for_training
    from llamaforge.training.optim import build_optimizer

    quantize = {"lf-qlora-q4_0": "q4_0", "lf-qlora-gguf": "gguf"}.get(variant)
    model, tok, _ = load_for_training(args.model, None, torch.device("cpu"), args.seq_len, progress=False,
                                      quantize=quantize)
    apply_lora(model, ["wq", "wv"], rank=8, alpha=16.0)
    if variant == "lf-lora-plain":
        def plain(self, x):
            return self.base(x) + self.scaling * ((x @ self.lora_a.t()) @ self.lora_b.t())
        LoRALinear.forward = plain
    if quantize is not None or args.checkpointing:
        enable_activation_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, "adamw", 2e-4, weight_decay=0.0, momentum=0.0, betas=(0.9, 0.999))
    data = batches(tok, args.seq_len, args.batch, args.steps)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "lf-lora-bf16")
    losses, times = [], []
    model.train()
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, y = data[step, :, :-1], data[step, :, 1:]
        with autocast:
            logits = model(x)
        loss = token_loss_sum(logits, y) / y.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"losses": losses, "times": times}


def run_peft(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llamaforge.training.modeling import load_for_training

    _, tok, _ = load_for_training(args.model, None, torch.device("cpu"), args.seq_len, progress=False)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, betas=(0.9, 0.999))
    data = batches(tok, args.seq_len, args.batch, args.steps)
    losses, times = [], []
    model.train()
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, y = data[step, :, :-1], data[step, :, 1:]
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"losses": losses, "times": times}


def worker(args) -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    result = run_peft(args) if args.variant == "hf-peft" else run_llamaforge(args.variant, args)
    timed = result["times"][1:] or result["times"]
    result.update(variant=args.variant, tokens_per_s=args.batch * args.seq_len * len(timed) / sum(timed),
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(result))


def hf_copy(model: str, out: Path) -> Path:
    """The model dequantized to float32 in Hugging Face's layout, for transformers."""
    from llamaforge import checkpoints
    from llamaforge.default_model import default_model_path

    path = default_model_path() if model == "default" else Path(model)
    ckpt = checkpoints.load(path, progress=False)  # quantized GGUF weights dequantized to float32
    state = dict(ckpt.state_dict)
    if ckpt.args.tie_embeddings:
        state.pop("output.weight", None)
    checkpoints.save_hf(ckpt.args, state, out, tokenizer_path=None, overwrite=True)
    return out


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
    keep = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))]
    return f"{name}; {' '.join(keep)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing for the float variants too")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--worker", dest="variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant is not None:
        worker(args)
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = hf_copy(args.model, Path(tmp) / "hf") if "hf-peft" in variants else None
        for variant in variants:
            cmd = [sys.executable, __file__, "--worker", variant, "--model", args.model, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
            if hf_dir is not None:
                cmd += ["--hf-dir", str(hf_dir)]
            if args.checkpointing:
                cmd.append("--checkpointing")
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if out.returncode or line is None:
                print(f"{variant} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            r = json.loads(line[len("RESULT "):])
            results.append(r)
            print(f"{variant:14s} {r['tokens_per_s']:8.1f} tok/s  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
                  f"loss step 1 {r['losses'][0]:.4f} -> step {len(r['losses'])} {r['losses'][-1]:.4f}", flush=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_flags(), "threads": args.threads,
              "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "results": results}
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
