"""`llamaforge demo`: Meta's two examples (text completion, then chat completion) on one model."""

from __future__ import annotations

import argparse
import sys
import time

from llamaforge.cli.common import add_model_flags, add_sampling_flags, build_from_flags

# The prompts of Meta's example_text_completion.py and example_chat_completion.py.
TEXT_PROMPTS = [
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
    """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
]

DIALOGS = [
    [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {"role": "assistant", "content": "Paris, the capital of France, is known for its stunning architecture, "
                                         "art museums, historical landmarks, and romantic atmosphere."},
        {"role": "user", "content": "What is so great about #1?"},
    ],
    [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
    ],
    [
        {"role": "system", "content": "Always answer with emojis"},
        {"role": "user", "content": "How to go from Beijing to NY?"},
    ],
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run Meta's text and chat completion examples", description=__doc__)
    add_model_flags(p, max_seq_len=512, max_batch_size=4)
    add_sampling_flags(p, max_gen_len=64)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    generator = build_from_flags(args)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    start = time.perf_counter()
    status(f"text completion: Meta's {len(TEXT_PROMPTS)} prompts together, up to {args.max_gen_len} tokens each ...")
    results = generator.text_completion(TEXT_PROMPTS, max_gen_len=args.max_gen_len, **sampling)
    for prompt, result in zip(TEXT_PROMPTS, results):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")
    status(f"chat completion: Meta's {len(DIALOGS)} dialogs together, up to {args.max_gen_len} tokens each ...")
    answers = generator.chat_completion(DIALOGS, max_gen_len=args.max_gen_len, **sampling)
    for dialog, result in zip(DIALOGS, answers):
        for msg in dialog:
            print(f"{msg['role'].capitalize()}: {msg['content']}\n")
        print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
        print("\n==================================\n")
    status(f"done in {time.perf_counter() - start:.1f}s")
    return 0


def status(text: str) -> None:
    """A line on stderr, so that long silences are explained and stdout stays Meta's output."""
    print(text, file=sys.stderr, flush=True)
