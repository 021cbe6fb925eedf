"""DPO (or SimPO) on the default model (SmolLM2-135M-Instruct): prefer direct answers to padded ones.

Each pair asks a short question (in the chat format); the chosen answer gives the answer at once, the
rejected one gives the same answer after a stock preamble ("Great question! Let me think about that.").
The training pairs (32 questions) and the held-out pairs (12 other questions, other preambles) are made
here, deterministically. Effect measured on the held-out pairs by the training loop's evaluation, before
training (step 0) and after:

- preference_accuracy: pairs whose chosen answer has the higher mean log-probability per token under
  the model (means the same before and after);
- reward_accuracy: pairs whose DPO implicit reward margin is > 0 (0 by definition before training);
- the validation DPO loss (log 2 = 0.693 before training).

LoRA rank 8 on every projection, AdamW, masked to the answers' tokens. With --quantize q4_0 the base is
4-bit (QLoRA); --loss simpo trains reference-free.

    python examples/dpo_default.py                          # 8 steps of 4 pairs (one epoch), minutes on 2 idle cores
    python examples/dpo_default.py --loss simpo --quantize q4_0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

QA = [
    ("What is the capital of France?", "Paris."), ("How many legs does a spider have?", "Eight."),
    ("What colour is the sky on a clear day?", "Blue."), ("What is 3 plus 4?", "7."),
    ("Which planet is closest to the Sun?", "Mercury."), ("What do bees make?", "Honey."),
    ("How many days are in a week?", "Seven."), ("What is frozen water called?", "Ice."),
    ("What is the largest ocean?", "The Pacific Ocean."), ("Who wrote Hamlet?", "William Shakespeare."),
    ("What gas do plants take in?", "Carbon dioxide."), ("How many hours are in a day?", "24."),
    ("What is the opposite of hot?", "Cold."), ("What animal says moo?", "A cow."),
    ("What is 10 minus 3?", "7."), ("Which month comes after June?", "July."),
    ("What is the capital of Japan?", "Tokyo."), ("How many sides does a triangle have?", "Three."),
    ("What do you call a baby dog?", "A puppy."), ("What is the boiling point of water in Celsius?", "100 degrees."),
    ("Which is the tallest animal?", "The giraffe."), ("What metal is liquid at room temperature?", "Mercury."),
    ("What is 5 times 6?", "30."), ("What language is spoken in Spain?", "Spanish."),
    ("How many continents are there?", "Seven."), ("What is the chemical symbol for gold?", "Au."),
    ("What is the first letter of the alphabet?", "A."), ("Which season follows winter?", "Spring."),
    ("What shape has four equal sides?", "A square."), ("What do cows drink?", "Water."),
    ("What is the capital of Italy?", "Rome."), ("How many minutes are in an hour?", "60."),
]
HELDOUT_QA = [
    ("What is the capital of Germany?", "Berlin."), ("How many wheels does a bicycle have?", "Two."),
    ("What colour are bananas when ripe?", "Yellow."), ("What is 2 plus 2?", "4."),
    ("Which planet is known as the Red Planet?", "Mars."), ("What do caterpillars become?", "Butterflies."),
    ("How many months are in a year?", "Twelve."), ("What is the largest mammal?", "The blue whale."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci."), ("What is 9 minus 4?", "5."),
    ("What is the capital of Canada?", "Ottawa."), ("How many legs does a cat have?", "Four."),
]
PREAMBLES = ["Great question! Let me think about that.", "That is a really interesting thing to ask.",
             "Well, there are many ways to look at this.", "Thanks for asking, I am happy to help with that."]
HELDOUT_PREAMBLES = ["What a wonderful question to consider!", "Let me take a moment to think this through."]


def write_pairs(path: Path, qa: list[tuple[str, str]], preambles: list[str], seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for question, answer in qa:
            f.write(json.dumps({"messages": [{"role": "user", "content": question}], "chosen": answer,
                                "rejected": f"{rng.choice(preambles)} {answer}"}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="runs/dpo")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--loss", default="dpo", choices=["dpo", "simpo"])
    parser.add_argument("--beta", type=float, default=None)
    parser.add_argument("--quantize", default=None, help="q4_0 / q8_0: a quantized base (QLoRA)")
    args = parser.parse_args()

    from llamaforge.training import TrainConfig, train

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_file = write_pairs(out / "pairs_train.jsonl", QA, PREAMBLES, seed=0)
    heldout = write_pairs(out / "pairs_heldout.jsonl", HELDOUT_QA, HELDOUT_PREAMBLES, seed=1)
    config = TrainConfig(
        model="default", data=[str(train_file)], val_data=[str(heldout)], out_dir=str(out), resume=False,
        seq_len=96, batch_size=4, max_steps=args.steps, lr=args.lr, warmup_steps=2, eval_every=args.steps,
        save_every=args.steps, optimizer="adamw", quantize=args.quantize, export="none",
        lora=dict(rank=8, alpha=16.0, targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"]),
        preference=dict(loss=args.loss, beta=args.beta),
    )
    result = train(config)
    before, after = result.val_metrics[0], result.val_metrics[args.steps]
    print(json.dumps({
        "loss": args.loss, "quantize": args.quantize, "steps": args.steps, "train_pairs": len(QA),
        "heldout_pairs": len(HELDOUT_QA), "tokens_per_s": round(result.tokens_per_s, 1),
        "heldout_loss": [round(result.val_losses[0], 4), round(result.val_losses[args.steps], 4)],
        "preference_accuracy": [before["preference_accuracy"], after["preference_accuracy"]],
        "reward_accuracy": [before["reward_accuracy"], after["reward_accuracy"]],
        "adapter": str(result.adapter),
    }, indent=1))


if __name__ == "__main__":
    main()
