"""spacy-llm model `llamaforge.Llama.v1`: registration, batching, robust parsing, and real tasks end to end.

Fast tests use a recording fake in place of the model or the tiny random checkpoint; the end-to-end
tests run the default model (SmolLM2-135M-Instruct) greedily with short answers on a few docs.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

spacy = pytest.importorskip("spacy")
pytest.importorskip("spacy_llm")

from spacy.util import load_config_from_str, load_model_from_config  # noqa: E402

import llamaforge.integrations.spacy as lf_spacy  # noqa: E402
from llamaforge.errors import ConfigError, GenerationError  # noqa: E402
from llamaforge.integrations import models  # noqa: E402
from llamaforge.integrations.llm_model import LlamaforgeLLM  # noqa: E402

NER_LABELS = ["PERSON", "ORG", "LOC"]
FEWSHOT = Path(__file__).resolve().parents[1] / "examples" / "data" / "ner_fewshot_v3.json"


def pipeline_config(task: str, model: str) -> str:
    """A spaCy config with one `llm` component: the given task and model blocks (unindented lines)."""
    return "\n".join(
        [
            "[nlp]", 'lang = "en"', 'pipeline = ["llm"]', "",
            "[components]", "",
            "[components.llm]", 'factory = "llm"', "save_io = true", "",
            "[components.llm.model]", '@llm_models = "llamaforge.Llama.v1"', model.strip(), "",
            "[components.llm.task]", task.strip(), "",
        ]
    )


NER_TASK = """
@llm_tasks = "spacy.NER.v3"
labels = ["PERSON", "ORG", "LOC"]
"""

TEXTCAT_TASK = """
@llm_tasks = "spacy.TextCat.v3"
labels = ["POSITIVE", "NEGATIVE"]
exclusive_classes = true
"""


def build(task: str, model: str):
    return load_model_from_config(load_config_from_str(pipeline_config(task, model)), auto_fill=True)


# -- registration --------------------------------------------------------------------------------


def test_registered_in_code():
    from spacy_llm.registry import registry

    assert registry.llm_models.get("llamaforge.Llama.v1") is lf_spacy.llamaforge_llama_v1
    assert "llamaforge_vectors" in spacy.blank("en").factory_names


#: The entry points pyproject.toml declares (spacy-llm's registry `llm_models` is created through
#: thinc's registry, so its entry-point group is `thinc_llm_models`; spaCy's factories use `spacy_factories`).
ENTRY_POINTS = {
    "thinc_llm_models": {"llamaforge.Llama.v1": "llamaforge.integrations.spacy:llamaforge_llama_v1"},
    "spacy_factories": {"llamaforge_vectors": "llamaforge.integrations.spacy:make_llamaforge_vectors"},
}

DISCOVERY = textwrap.dedent(
    """
    import importlib.metadata, sys
    found = {(ep.group, ep.name, ep.value) for g in GROUPS for ep in importlib.metadata.entry_points(group=g)}
    if not EXPECTED <= found:
        print("not installed:", sorted(EXPECTED - found))
        sys.exit(0)
    import spacy
    from spacy_llm.registry import registry
    assert "llamaforge.integrations.spacy" not in sys.modules
    fn = registry.llm_models.get("llamaforge.Llama.v1")
    assert fn.__module__ == "llamaforge.integrations.spacy", fn.__module__
    nlp = spacy.blank("en")
    assert "llamaforge_vectors" in nlp.factory_names
    nlp.add_pipe("llamaforge_vectors")  # builds the component; the model loads on first use only
    print("ok")
    """
)


def _run_discovery(cwd, extra_path: str | None = None) -> str:
    """Run DISCOVERY in a fresh interpreter; cwd away from the repository, whose stale build metadata
    (llamaforge.egg-info, same distribution name) would otherwise shadow the installed one."""
    expected = {(g, name, target) for g, entries in ENTRY_POINTS.items() for name, target in entries.items()}
    code = f"GROUPS = {sorted(ENTRY_POINTS)!r}\nEXPECTED = {expected!r}\n" + DISCOVERY
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_declared_entry_points_are_found_without_import(tmp_path):
    """The entry points, as an installed distribution declares them, make spaCy find both names."""
    probe = tmp_path / "site"
    info = probe / "llamaforge_entry_points_probe-0.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llamaforge-entry-points-probe\nVersion: 0.0.0\n")
    lines = []
    for group, entries in ENTRY_POINTS.items():
        lines.append(f"[{group}]")
        lines.extend(f"{name} = {target}" for name, target in entries.items())
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    repo = str(Path(__file__).resolve().parents[1])  # llamaforge importable even if not installed
    assert _run_discovery(tmp_path, os.pathsep.join([str(probe), repo])) == "ok"


def test_installed_entry_points_are_found_without_import(tmp_path):
    """After `pip install llamaforge[spacy]` (or -e .), spaCy finds both names with no llamaforge import."""
    result = _run_discovery(tmp_path)
    if result.startswith("not installed"):
        pytest.skip(f"llamaforge's entry points are {result} (re-run `pip install -e .` after adding them)")
    assert result == "ok"


def test_llamaforge_import_does_not_import_spacy():
    code = (
        "import sys, llamaforge, llamaforge.integrations, llamaforge.integrations.llm_model, "
        "llamaforge.integrations.alignment\n"
        "assert not {'spacy', 'spacy_llm', 'thinc'} & set(sys.modules), sorted(sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, message",
    [
        ({"temprature": 0}, "unknown generation setting"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_gen_len": 0}, "max_gen_len"),
        ({"top_k": 2.5}, "top_k"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_generation_settings_are_config_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        LlamaforgeLLM(config=config)


def test_max_seq_len_must_leave_room_for_a_prompt():
    with pytest.raises(ConfigError, match="no room"):
        LlamaforgeLLM(max_seq_len=100, config={"max_gen_len": 100})
    with pytest.raises(ConfigError, match="max_seq_len"):
        LlamaforgeLLM(max_seq_len="long")


def test_bad_settings_in_a_spacy_config_fail_when_the_pipeline_is_built():
    with pytest.raises(ConfigError, match="unknown generation setting"):
        build(NER_TASK, 'max_seq_len = 256\nconfig = {"max_tokens": 5}')


# -- batching with a recording fake --------------------------------------------------------------


class RecordingLlama:
    """Stands in for `Llama`: answers each prompt with its own text and records the batches."""

    def __init__(self, max_batch_size: int = 3):
        self.max_batch_size = max_batch_size
        self.max_seq_len = 1024
        self.batches: list[list[str]] = []

    def text_completion(self, prompts, **kwargs):
        self.batches.append(list(prompts))
        return [{"generation": f"<{p}>"} for p in prompts]

    def chat_completion(self, dialogs, **kwargs):
        self.batches.append([d[-1]["content"] for d in dialogs])
        return [{"generation": {"role": "assistant", "content": f"<{d[-1]['content']}>"}} for d in dialogs]


@pytest.mark.parametrize("chat", [True, False])
def test_prompts_of_all_docs_are_batched_and_answers_return_in_order(chat):
    fake = RecordingLlama(max_batch_size=3)
    model = LlamaforgeLLM(llama=fake, chat=chat)
    prompts = [["a", "bbbb"], [], ["cc"], ["dddddd", "e", "ff", "ggg"]]  # docs with 2, 0, 1, 4 shards
    answers = model(iter([iter(p) for p in prompts]))  # spacy-llm passes generators
    assert answers == [[f"<{p}>" for p in doc] for doc in prompts]
    assert all(len(b) <= 3 for b in fake.batches)
    assert sorted(p for b in fake.batches for p in b) == sorted(p for doc in prompts for p in doc)
    assert len(fake.batches) == 3  # 7 prompts in batches of at most 3
    lengths = [len(p) for b in fake.batches for p in b]
    assert lengths == sorted(lengths, reverse=True)  # longest first: similar lengths share a batch


def test_system_prompt_goes_first_in_each_dialog():
    seen = []

    class Fake(RecordingLlama):
        def chat_completion(self, dialogs, **kwargs):
            seen.extend(dialogs)
            return super().chat_completion(dialogs, **kwargs)

    LlamaforgeLLM(llama=Fake(), system_prompt="Be brief.")([["x"]])
    assert seen == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}]]
    with pytest.raises(ConfigError, match="chat"):
        LlamaforgeLLM(chat=False, system_prompt="Be brief.")


def test_context_length_is_in_words_and_needs_no_model_when_max_seq_len_is_set():
    model = LlamaforgeLLM(max_seq_len=1000, config={"max_gen_len": 200})
    assert model.context_length == 400  # (1000 - 200) tokens at 2 tokens per word
    assert model._llama is None  # nothing was loaded


# -- robust parsing: malformed answers leave docs without entities -------------------------------

MALFORMED = [
    "",
    "I cannot help with that.",
    "1. Barack Obama | True",  # too few fields
    "1. Barack Obama | True | PRESIDENT | not a label of this task",
    "1. Nobody | True | PERSON | not in the text",
    "1. | True | PERSON | empty span text",
    "1. Barack Obama | maybe | PERSON | not True",
    "PERSON: Barack Obama",  # another task version's format
    "|||||\n\n\x00\ufffd 🤖 ```json {\"PERSON\": [\"Barack\"]}```",
    "1. ama Ob | True | PERSON | does not align to tokens",
]


@pytest.fixture
def malformed_nlp(monkeypatch):
    answers = iter(MALFORMED * 2)
    monkeypatch.setattr(LlamaforgeLLM, "generate", lambda self, prompts: [next(answers) for _ in prompts])
    return build(NER_TASK + 'alignment_mode = "strict"', "max_seq_len = 1024")


def test_malformed_answers_leave_docs_without_entities(malformed_nlp):
    text = "Barack Obama visited Microsoft in Seattle."
    for _ in MALFORMED:
        doc = malformed_nlp(text)
        assert doc.ents == ()
    docs = list(malformed_nlp.pipe([text] * len(MALFORMED)))
    assert [d.ents for d in docs] == [()] * len(MALFORMED)


def test_model_errors_are_not_swallowed(monkeypatch):
    def fail(self, prompts):
        raise GenerationError("prompt 0 has 5000 tokens but max_seq_len is 1024")

    monkeypatch.setattr(LlamaforgeLLM, "generate", fail)
    nlp = build(NER_TASK, "max_seq_len = 1024")
    with pytest.raises(GenerationError, match="max_seq_len"):
        nlp("Barack Obama visited Microsoft in Seattle.")


# -- sharding and the real generation path --------------------------------------------------------

RAW_TASK = '@llm_tasks = "spacy.Raw.v1"'


def test_sharded_docs_get_one_answer_per_shard(monkeypatch):
    """A doc longer than the context is split by spacy-llm; each shard's answer comes back to it."""
    seen = []

    def echo(self, prompts):
        seen.append(len(prompts))
        return ["[" + p.split("Text:\n", 1)[1].split("\nReply:", 1)[0] + "]" for p in prompts]

    monkeypatch.setattr(LlamaforgeLLM, "generate", echo)
    # context_length = (60 - 4) / 2 = 28 words: the 40-word doc below needs several shards
    nlp = build(RAW_TASK, 'max_seq_len = 60\nmax_batch_size = 2\nconfig = {"max_gen_len": 4}')
    long_text = " ".join(f"w{i}" for i in range(40))
    docs = list(nlp.pipe(["short one", long_text, "another short one"]))
    assert docs[0]._.llm_reply == "[short one]" and docs[2]._.llm_reply == "[another short one]"
    shards = docs[1].user_data["llm_io"]["llm"]["response"]
    assert len(shards) > 1
    assert docs[1]._.llm_reply == " ".join(shards)  # the Raw task joins its shards' answers
    assert "".join(shards).replace("[", " ").replace("]", " ").split() == long_text.split()
    assert max(seen) <= 2 and sum(seen) == len(shards) + 2


def test_added_from_python_like_spacy_llms_own_models(monkeypatch):
    monkeypatch.setattr(LlamaforgeLLM, "generate", lambda self, prompts: ["POSITIVE" for _ in prompts])
    nlp = spacy.blank("en")
    llm = nlp.add_pipe(
        "llm",
        config={
            "task": {"@llm_tasks": "spacy.TextCat.v3", "labels": ["POSITIVE", "NEGATIVE"]},
            "model": {"@llm_models": "llamaforge.Llama.v1", "max_seq_len": 1024, "config": {"max_gen_len": 4}},
        },
    )
    assert isinstance(llm._model, LlamaforgeLLM) and llm._model.generation["max_gen_len"] == 4
    assert nlp("What a lovely day.").cats == {"POSITIVE": 1.0, "NEGATIVE": 0.0}


def test_pipe_equals_one_doc_at_a_time_on_a_real_model(tiny_checkpoints):
    """Greedy rows of a ragged batch equal each prompt alone (tiny random checkpoint, raw completion)."""
    model = f'model = "{tiny_checkpoints.gguf}"\ndevice = "cpu"\nchat = false\nmax_batch_size = 3\n'
    model += 'config = {"temperature": 0, "max_gen_len": 8}'
    nlp = build(RAW_TASK, model)
    texts = ["the llama model", "hello world", "a", "theory of relativity states that", "cheese sea otter"]
    one_by_one = [nlp(t)._.llm_reply for t in texts]
    piped = [d._.llm_reply for d in nlp.pipe(texts, batch_size=5)]
    assert piped == one_by_one
    assert all(isinstance(r, str) for r in piped)


# -- end to end with the default model -----------------------------------------------------------


@pytest.fixture(scope="module")
def shared_default(default_llama):
    """Pipelines naming the default model on the CPU reuse the session's already loaded one."""
    models.preload(default_llama)
    yield default_llama
    models.clear_cache()


@pytest.mark.slow
def test_ner_end_to_end_with_the_default_model(shared_default):
    """spacy.NER.v3 with two few-shot examples; one doc and a short answer keep this CI-sized."""
    nlp = build(
        NER_TASK + '\n[components.llm.task.examples]\n@misc = "spacy.FewShotReader.v1"\n'
        f'path = "{FEWSHOT}"',
        'device = "cpu"\nmax_seq_len = 2048\nconfig = {"temperature": 0, "max_gen_len": 32}',
    )
    text = "Angela Merkel met Emmanuel Macron in Paris."
    doc = nlp(text)
    assert doc.text == text
    response = doc.user_data["llm_io"]["llm"]["response"][0]
    assert isinstance(response, str) and response.strip()
    for ent in doc.ents:  # valid spans over the doc's own tokens, with the task's labels
        assert ent.label_ in NER_LABELS
        assert 0 <= ent.start < ent.end <= len(doc)
        assert ent.text == text[ent.start_char : ent.end_char]
    # a model-quality check, kept to the easiest case: the first line names the first person
    assert ("Angela Merkel", "PERSON") in {(e.text, e.label_) for e in doc.ents}, response


@pytest.mark.slow
def test_textcat_end_to_end_with_the_default_model(shared_default):
    nlp = build(TEXTCAT_TASK, 'device = "cpu"\nmax_seq_len = 2048\nconfig = {"temperature": 0, "max_gen_len": 6}')
    texts = ["I loved this film, it was wonderful!", "This was the worst meal I have ever had."]
    docs = [nlp(t) for t in texts]
    for doc in docs:
        assert set(doc.cats) == {"POSITIVE", "NEGATIVE"}
        assert all(score in (0.0, 1.0) for score in doc.cats.values())
        assert sum(doc.cats.values()) <= 1.0  # exclusive classes
    piped = list(nlp.pipe(texts))
    assert [d.cats for d in piped] == [d.cats for d in docs]
    assert [d.user_data["llm_io"] for d in piped] == [d.user_data["llm_io"] for d in docs]
