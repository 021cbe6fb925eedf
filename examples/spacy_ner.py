"""Named entities with spaCy + spacy-llm + a local llamaforge model, scored on a small hand-labelled set.

    pip install "llamaforge[spacy]"
    python examples/spacy_ner.py                    # default model (SmolLM2-135M-Instruct), CPU or GPU
    python examples/spacy_ner.py --model path/to/Llama-3.2-1B-Instruct --limit 5

The pipeline is a blank English spaCy pipeline with one `llm` component: spacy-llm's NER task
(`spacy.NER.v3`: the model lists entities one per line as `text | True/False | LABEL | reason`, with
two few-shot examples from examples/data/ner_fewshot_v3.json) answered by `llamaforge.Llama.v1`.

The evaluation set, examples/data/ner_eval.jsonl, is 22 English sentences written for this example
(20 with entities, 2 without; 55 entities: PERSON, ORG, LOC, where LOC covers cities, countries,
regions, rivers and mountains). Offsets were computed from the entity strings and each sentence
checked by hand. Scores are exact matches of (start, end, label), micro-averaged, as spaCy's
`ents_p/r/f` are.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import spacy
from spacy.training import Example
from spacy.util import load_config_from_str, load_model_from_config

import llamaforge.integrations.spacy  # noqa: F401  (registers llamaforge.Llama.v1; entry points do too)

HERE = Path(__file__).parent
LABELS = ["PERSON", "ORG", "LOC"]


def make_config(model: str | None, device: str, chat: bool, max_gen_len: int, examples: Path) -> str:
    model_line = "model = null" if model is None else f"model = {json.dumps(model)}"
    return f"""
[nlp]
lang = "en"
pipeline = ["llm"]

[components]

[components.llm]
factory = "llm"
save_io = true

[components.llm.task]
@llm_tasks = "spacy.NER.v3"
labels = {json.dumps(LABELS)}

[components.llm.task.examples]
@misc = "spacy.FewShotReader.v1"
path = {json.dumps(str(examples))}

[components.llm.model]
@llm_models = "llamaforge.Llama.v1"
{model_line}
device = {json.dumps(device)}
chat = {str(chat).lower()}
max_batch_size = 4
config = {{"temperature": 0, "max_gen_len": {max_gen_len}}}
"""


def load_gold(nlp, path: Path, limit: int | None) -> list:
    gold = []
    for line in path.read_text(encoding="utf-8").splitlines()[:limit]:
        row = json.loads(line)
        doc = nlp.make_doc(row["text"])
        spans = [doc.char_span(s, e, label=label) for s, e, label in row["entities"]]
        if any(span is None for span in spans):
            raise ValueError(f"an entity of {row['text']!r} does not fall on spaCy token boundaries")
        doc.ents = spans
        gold.append(doc)
    return gold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint path (default: the default model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-chat", dest="chat", action="store_false", help="raw completion, no chat format")
    parser.add_argument("--max-gen-len", type=int, default=96)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N sentences")
    parser.add_argument("--data", type=Path, default=HERE / "data" / "ner_eval.jsonl")
    parser.add_argument("--examples", type=Path, default=HERE / "data" / "ner_fewshot_v3.json")
    parser.add_argument("--show", action="store_true", help="print each sentence's entities and raw answer")
    args = parser.parse_args()

    cfg = load_config_from_str(make_config(args.model, args.device, args.chat, args.max_gen_len, args.examples))
    nlp = load_model_from_config(cfg, auto_fill=True)
    gold = load_gold(spacy.blank("en"), args.data, args.limit)
    start = time.perf_counter()
    predicted = list(nlp.pipe([g.text for g in gold], batch_size=8))
    seconds = time.perf_counter() - start
    examples = [Example(p, g) for p, g in zip(predicted, gold)]
    if args.show:
        for p, g in zip(predicted, gold):
            print(f"\n{g.text}\n  gold: {[(e.text, e.label_) for e in g.ents]}")
            print(f"  pred: {[(e.text, e.label_) for e in p.ents]}")
            print(f"  answer: {p.user_data['llm_io']['llm']['response'][0]!r}")
    scores = nlp.get_pipe("llm").score(examples)
    n_ents = sum(len(g.ents) for g in gold)
    print(f"\n{len(gold)} sentences, {n_ents} gold entities, {seconds:.0f} s")
    print(f"precision {scores['ents_p']:.3f}  recall {scores['ents_r']:.3f}  F1 {scores['ents_f']:.3f}")
    for label, s in sorted((scores.get("ents_per_type") or {}).items()):
        print(f"  {label:7s} P {s['p']:.3f}  R {s['r']:.3f}  F {s['f']:.3f}")


if __name__ == "__main__":
    main()
