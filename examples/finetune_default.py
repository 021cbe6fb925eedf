"""LoRA fine-tune of the default model (SmolLM2-135M-Instruct) on a small instruction set, on a CPU.

The instruction set (examples/data/forge_identity_train.jsonl, 24 dialogs) teaches the model a new
name: "Forge, fine-tuned with llamaforge" (out of the box it says it is SmolLM, trained by Hugging
Face). Eight held-out dialogs with other wordings (forge_identity_heldout.jsonl) measure the change two
ways: the loss on their assistant answers (the training loop's validation loss, before and after),
and how many of their questions the model answers with the name "Forge" when asked greedily through
`Llama.chat_completion`, before (the default model as shipped) and after (the exported, merged model
loaded back with `Llama.build`).

Training: LoRA rank 8 on every projection of the 30 blocks (2.4M trainable parameters of 135M),
AdamW, loss on assistant tokens only, dialogs packed into 128-token windows. The merged model is
exported as a GGUF file (the tokenizer travels in its metadata).

    python examples/finetune_default.py                    # 12 steps of 2 x 128 tokens (about 2 epochs)
    python examples/finetune_default.py --steps 30 --lr 1e-3   # longer, gentler
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN = HERE / "data" / "forge_identity_train.jsonl"
HELDOUT = HERE / "data" / "forge_identity_heldout.jsonl"


def questions(path: Path) -> list[str]:
    return [json.loads(line)["messages"][0]["content"] for line in path.read_text().splitlines() if line.strip()]


def answer_all(llama, qs: list[str], max_gen_len: int = 32) -> list[str]:
    out = []
    for i in range(0, len(qs), llama.max_batch_size):
        dialogs = [[{"role": "user", "content": q}] for q in qs[i:i + llama.max_batch_size]]
        out += [r["generation"]["content"].strip()
                for r in llama.chat_completion(dialogs, temperature=0, max_gen_len=max_gen_len)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="runs/forge")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    from llamaforge.api import Llama
    from llamaforge.training import LoRAConfig, TrainConfig, train

    qs = questions(HELDOUT)
    base = Llama.build(None, max_seq_len=256, max_batch_size=8, progress=False)
    before = answer_all(base, qs)
    del base

    config = TrainConfig(
        model="default", data=[str(TRAIN)], val_data=[str(HELDOUT)], out_dir=args.out_dir, seq_len=128,
        batch_size=2, max_steps=args.steps, lr=args.lr, warmup_steps=3, optimizer="adamw", weight_decay=0.0,
        lora=LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"]),
        eval_every=10, eval_batches=4, save_every=10, export="gguf", export_dtype="f16", resume=False,
    )
    t0 = time.perf_counter()
    result = train(config)
    minutes = (time.perf_counter() - t0) / 60

    tuned = Llama.build(str(result.exported), max_seq_len=256, max_batch_size=8, progress=False)
    after = answer_all(tuned, qs)
    hits_before = sum("forge" in a.lower() for a in before)
    hits_after = sum("forge" in a.lower() for a in after)
    steps = sorted(result.val_losses)
    summary = {
        "val_loss_before": result.val_losses[steps[0]], "val_loss_after": result.val_losses[steps[-1]],
        "named_forge_before": f"{hits_before}/{len(qs)}", "named_forge_after": f"{hits_after}/{len(qs)}",
        "train_tokens_per_s": round(result.tokens_per_s, 1), "minutes": round(minutes, 2), "steps": result.step,
        "exported": str(result.exported), "answers": [{"question": q, "before": b, "after": a}
                                                     for q, b, a in zip(qs, before, after)],
    }
    Path(args.out_dir, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for item in summary["answers"]:
        print(f"\nQ: {item['question']}\n  before: {item['before']}\n  after:  {item['after']}")
    print(f"\nheld-out answer loss {summary['val_loss_before']:.3f} -> {summary['val_loss_after']:.3f}; "
          f"answers naming Forge {hits_before}/{len(qs)} -> {hits_after}/{len(qs)}; "
          f"{result.tokens_per_s:.0f} tokens/s, {minutes:.1f} min; model: {result.exported}")


if __name__ == "__main__":
    main()
