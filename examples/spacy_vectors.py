"""Sentence and word similarity in spaCy from a Llama's hidden states (`llamaforge_vectors`).

    pip install "llamaforge[spacy]"
    python examples/spacy_vectors.py [--model path/to/checkpoint]

A blank English pipeline gets the `llamaforge_vectors` component, which sets `doc.tensor` (one row
per spaCy token: the mean of the final hidden states of the model tokens that overlap it) and makes
`doc.vector`, `span.vector`, `token.vector` and `.similarity()` use it.
"""

from __future__ import annotations

import argparse

import spacy

import llamaforge.integrations.spacy  # noqa: F401  (registers the factory; entry points do too)

PAIRS = [
    ("The cat sat on the mat.", "A cat was sitting on the rug."),
    ("The cat sat on the mat.", "Stock markets fell sharply on Tuesday."),
    ("How do I reset my password?", "What is the way to change my forgotten password?"),
    ("How do I reset my password?", "The river flows into the sea near the old harbour."),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint path (default: the default model)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    nlp = spacy.blank("en")
    nlp.add_pipe("llamaforge_vectors", config={"model": args.model, "device": args.device})
    for a, b in PAIRS:
        doc_a, doc_b = nlp.pipe([a, b])
        print(f"{doc_a.similarity(doc_b):.3f}  {a!r} ~ {b!r}")
    doc = nlp("The bank approved my loan after the river bank flooded.")
    print(f"\ndoc.tensor: {doc.tensor.shape} (spaCy tokens x model width)")
    bank1, bank2, loan = doc[1], doc[8], doc[4]
    print(f"{bank1.similarity(bank2):.3f}  bank ~ bank   {bank1.similarity(loan):.3f}  bank ~ loan")


if __name__ == "__main__":
    main()
