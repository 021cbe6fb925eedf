"""`llamaforge tokenizer`: make and inspect tokenizers.

    llamaforge tokenizer train corpus.txt -o tok.model --vocab-size 4096   # Llama-style sentencepiece BPE
    llamaforge tokenizer encode tok.model "Hello world"                     # ids and pieces
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train or inspect a tokenizer", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    t = tsub.add_parser("train", help="train a sentencepiece BPE tokenizer with Llama's settings")
    t.add_argument("inputs", nargs="+", help="text files")
    t.add_argument("-o", "--output", required=True, help="where to write tokenizer.model")
    t.add_argument("--vocab-size", "--vocab_size", dest="vocab_size", type=int, default=4096, help="tokens in the vocabulary")
    t.add_argument("--max-sentences", dest="max_sentences", type=int, default=2_000_000,
                   help="most lines sampled for training")
    t.set_defaults(run=run_train)
    e = tsub.add_parser("encode", help="show the ids and pieces of a text")
    e.add_argument("tokenizer", help="tokenizer.model / tokenizer.json / .gguf")
    e.add_argument("text", help="the text to encode")
    e.add_argument("--bos", action="store_true", help="prepend BOS")
    e.set_defaults(run=run_encode)
    p.set_defaults(run=lambda args: (p.print_help(), 2)[1])


def run_train(args: argparse.Namespace) -> int:
    from llamaforge.tokenizer import Tokenizer
    from llamaforge.training.tokenizer_train import train_tokenizer

    out = train_tokenizer(args.inputs, args.output, args.vocab_size, max_sentences=args.max_sentences)
    tok = Tokenizer.from_file(out)
    sample = "The quick brown fox jumps over the lazy dog, 1234 times."
    print(f"wrote {out}: {tok.n_words} tokens (bos={tok.bos_id}, eos={tok.eos_id}); "
          f"{sample!r} -> {len(tok.encode(sample))} tokens")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from llamaforge.tokenizer import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer)
    ids = tok.encode(args.text, bos=args.bos)
    print(ids)
    print([tok.id_to_piece(i) for i in ids])
    return 0
