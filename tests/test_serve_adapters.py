"""Multi-LoRA serving: requests with different adapters (and none) share batches and get their solo answers.

Tiny random models with the default model's tokenizer; adapters written here in PEFT's layout (Hugging
Face names and q/k row order). Tolerances: greedy token ids identical (solo vs mixed batch, and adapter
vs the merged-weights model); logits of an adapter within 1e-4 of the merged float32 model's (the delta
is summed in another order than W + s * B @ A).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from llamaforge.checkpoints.hf import meta_to_hf_qk
from llamaforge.errors import CheckpointError
from llamaforge.generation.engine import Engine, Job
from llamaforge.generation.runner import PrefillChunk, Runner
from llamaforge.generation.sampler import SamplingParams
from llamaforge.model import ModelArgs, Transformer
from llamaforge.runtime import DecodeStep
from llamaforge.checkpoints.adapters import read_adapter
from llamaforge.runtime.adapters import AdapterTable
from tests.test_server_engine import PROMPTS, encode, run

CPU = torch.device("cpu")
MAX_SEQ = 128
HF = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
      "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}


def write_peft(folder, model, targets=("wq", "wk", "wv", "w2"), rank=4, alpha=8, seed=0, scale=0.3):
    """A random PEFT LoRA folder for `model`; returns {Meta module: (A, B)} in Meta's row order."""
    from safetensors.torch import save_file

    args = model.args
    g = torch.Generator().manual_seed(seed)
    tensors, meta = {}, {}
    for i, layer in enumerate(model.layers):
        for leaf in targets:
            parent = layer.attention if leaf in ("wq", "wk", "wv", "wo") else layer.feed_forward
            lin = getattr(parent, leaf)
            lin = getattr(lin, "base", lin)
            a = torch.randn(rank, lin.in_features, generator=g) * scale
            b = torch.randn(lin.out_features, rank, generator=g) * scale
            name = f"layers.{i}.{'attention' if parent is layer.attention else 'feed_forward'}.{leaf}"
            meta[name] = (a, b)
            heads = {"wq": args.n_heads, "wk": args.n_kv_heads}.get(leaf)
            hf_b = meta_to_hf_qk(b, heads, args.head_dim) if heads else b
            stem = f"base_model.model.model.layers.{i}.{HF[leaf]}"
            tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = a, hf_b
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "bias": "none", "fan_in_fan_out": False,
         "use_rslora": False, "target_modules": sorted(HF[t].split(".")[1] for t in targets)}))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return meta


def merged(model, adapter, scaling):
    """A float copy of `model` with W + scaling * B @ A in every adapted projection."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, (a, b) in adapter.items():
            m.get_submodule(name).weight += scaling * (b @ a)
    return m


@pytest.fixture(scope="module")
def tokenizer():
    from llamaforge.default_model import default_model_path
    from llamaforge.tokenizer import Tokenizer

    try:
        return Tokenizer.from_file(default_model_path())
    except Exception as exc:
        pytest.skip(f"default model tokenizer unavailable: {exc}")


def tiny(tokenizer, dim=64):
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words,
                              hidden_dim=2 * dim, max_seq_len=MAX_SEQ))
    with torch.no_grad():
        m.output.weight.mul_(8)  # peaked distributions: greedy choices far from ties
    return m.eval()


def greedy(prompt, adapter=None, max_tokens=10):
    return Job(list(prompt), max_tokens, SamplingParams(temperature=0), stop_ids=frozenset({0, 2}), adapter=adapter)


def answers(engine, jobs):
    return [r["choices"][0]["tokens"] for r in run(engine, jobs)]


def test_adapter_logits_equal_the_merged_model(tokenizer, tmp_path):
    base = tiny(tokenizer)
    weights = write_peft(tmp_path / "a", base)
    model = copy.deepcopy(base)
    table = AdapterTable(model)
    served = table.add("a", tmp_path / "a")
    assert served.scaling == 2.0 and set(served.weights) == set(weights)
    ref = merged(base, weights, served.scaling)
    ids = encode(tokenizer, PROMPTS[1:2])[0]
    with torch.no_grad():
        runner = Runner(model, CPU, adapters=table)
        cache = runner.new_cache(2, MAX_SEQ)
        tables = cache.slot_tables.tolist()  # the blocks of slots 0 and 1
        # row 0 the adapter, row 1 the base model, in one forward
        got = runner.prefill(cache, [PrefillChunk(ids, 0, tables[0], all_logits=True, adapter=served),
                                     PrefillChunk(ids, 0, tables[1], all_logits=True)])
        want = ref(torch.tensor([ids]))[0]
        assert torch.allclose(got[0], want, atol=1e-4)
        alone = Runner(base, CPU).prefill(runner.new_cache(1, MAX_SEQ), [PrefillChunk(ids, 0, tables[0],
                                                                                      all_logits=True)])[0]
        assert torch.allclose(got[1], alone, atol=1e-5)  # the base row is the base model (float GEMMs: last bits)
        assert not torch.allclose(got[0], got[1], atol=1e-2)  # the adapter really changes the model
        step = runner.decode(cache, [5, 5], [len(ids)] * 2, tables, [served, None])  # (2, V)
        ref_all = ref(torch.tensor([ids + [5]]))[0, -1]
        assert torch.allclose(step[0], ref_all, atol=1e-4)


@pytest.mark.parametrize("quantized", [False, True])
def test_mixed_adapters_in_one_batch_equal_each_alone(tokenizer, tmp_path, quantized):
    """Base, adapter a and adapter b requests together: each answer equals the request alone; on a Q8_0 model
    the fused C++ step still runs the base rows; on the float model a equals the merged-weights model."""
    from llamaforge.quantize import quantize_model_weights

    base = tiny(tokenizer, dim=128)
    wa = write_peft(tmp_path / "a", base, seed=1)
    write_peft(tmp_path / "b", base, targets=("wo", "w1", "w3"), rank=2, alpha=4, seed=2)
    model = quantize_model_weights(copy.deepcopy(base), "q8_0") if quantized else copy.deepcopy(base)
    table = AdapterTable(model)
    table.add("a", tmp_path / "a")
    table.add("b", tmp_path / "b")
    step = DecodeStep(model, fused=True)
    eng = Engine(model, tokenizer, n_slots=6, max_seq_len=MAX_SEQ, device=CPU, chunk=8, max_num_batched_tokens=64,
                 decode_step=step, adapters=table)
    eng.start()
    try:
        prompts = encode(tokenizer, PROMPTS[:3])
        jobs = [(p, name) for p in prompts for name in (None, "a", "b")][:6]
        alone = [answers(eng, [greedy(p, name)])[0] for p, name in jobs]
        if quantized and step.fused is not None:
            assert step.ran_fused  # base rows alone ran the C++ step
        eng.pool.clear_cache()
        together = answers(eng, [greedy(p, name) for p, name in jobs])
        assert together == alone
        assert alone[0] != alone[1] or alone[0] != alone[2]  # adapters change answers
        again = answers(eng, [greedy(p, name) for p, name in jobs])  # prefixes from the cache, per adapter
        assert again == alone
    finally:
        eng.close()
    if not quantized:
        ref = Engine(merged(base, wa, 2.0), tokenizer, n_slots=2, max_seq_len=MAX_SEQ, device=CPU, chunk=8)
        ref.start()
        try:
            assert [answers(ref, [greedy(p)])[0] for p, name in jobs if name == "a"] == \
                [a for a, (p, name) in zip(alone, jobs) if name == "a"]
        finally:
            ref.close()


def test_unknown_or_removed_adapters_are_clear_errors(tokenizer, tmp_path):
    from llamaforge.errors import GenerationError

    model = tiny(tokenizer)
    write_peft(tmp_path / "a", model)
    table = AdapterTable(model)
    eng = Engine(model, tokenizer, n_slots=2, max_seq_len=MAX_SEQ, device=CPU, adapters=table)
    with pytest.raises(GenerationError, match="no LoRA adapter 'a' is loaded"):
        eng.check(greedy([1, 2, 3], "a"))
    table.add("a", tmp_path / "a")
    eng.check(greedy([1, 2, 3], "a"))
    table.remove("a")
    with pytest.raises(GenerationError, match="loaded: none"):
        eng.check(greedy([1, 2, 3], "a"))


def test_peft_files_that_do_not_fit_the_model_are_refused(tokenizer, tmp_path):
    model = tiny(tokenizer)
    other = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=64))
    write_peft(tmp_path / "small", other)
    with pytest.raises(CheckpointError, match="another model"):
        read_adapter(tmp_path / "small", model.args)
    write_peft(tmp_path / "ok", model)
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="only LoRA"):
        read_adapter(tmp_path / "ok", model.args)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_adapter(tmp_path / "missing", model.args)


def test_training_and_serving_read_one_adapter_file_alike(tokenizer, tmp_path):
    # One reader (checkpoints/adapters.py): what the table serves is what training's reader gives, for a
    # PEFT folder and for the same adapter as a GGUF LoRA file; an output-layer adapter is merged, not served.
    from llamaforge.checkpoints.adapters import Adapter, save_gguf_lora, save_peft

    model = tiny(tokenizer)
    written = write_peft(tmp_path / "a", model)
    read = read_adapter(tmp_path / "a", model.args)
    save_gguf_lora(read, model.args, tmp_path / "a.gguf")
    table = AdapterTable(model)
    for name, path in (("peft", tmp_path / "a"), ("gguf", tmp_path / "a.gguf")):
        served = table.add(name, path)
        assert served.scaling == read.scaling and served.rank == read.rank and set(served.weights) == set(written)
        for meta, (a, b) in written.items():
            assert torch.equal(served.weights[meta][0], a) and torch.equal(served.weights[meta][1], b)
    out_w = (torch.zeros(4, model.args.dim), torch.zeros(model.args.vocab_size, 4))
    save_peft(Adapter({"output": out_w}, 8.0, 4), model.args, tmp_path / "head")
    with pytest.raises(CheckpointError, match="blocks' projections only"):
        table.add("head", tmp_path / "head")


def test_http_serves_adapters_by_model_name_and_admin_routes_need_the_key(tokenizer, tmp_path):
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from llamaforge.api import Llama
    from llamaforge.server.app import create_app

    write_peft(tmp_path / "a", tiny(tokenizer))
    write_peft(tmp_path / "b", tiny(tokenizer), seed=3)
    llama = Llama(tiny(tokenizer), tokenizer, max_seq_len=MAX_SEQ, max_batch_size=4, device=CPU)
    llama.load_adapter("serve2", tmp_path / "a")
    auth = {"Authorization": "Bearer k"}
    body = {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}
    with TestClient(create_app(llama, model_name="tiny", api_key="k")) as c:
        assert [m["id"] for m in c.get("/v1/models", headers=auth).json()["data"]] == ["tiny", "serve2"]
        base = c.post("/v1/completions", json={**body, "model": "tiny"}, headers=auth).json()
        tuned = c.post("/v1/completions", json={**body, "model": "serve2"}, headers=auth).json()
        assert tuned["model"] == "serve2" and tuned["choices"][0]["text"] != base["choices"][0]["text"]
        missing = c.post("/v1/completions", json={**body, "model": "other"}, headers=auth)
        assert missing.status_code == 404 and "'serve2'" in missing.json()["error"]["message"]
        load_b = {"lora_name": "b", "lora_path": str(tmp_path / "b")}
        assert c.post("/v1/load_lora_adapter", json=load_b).status_code == 401
        bad = c.post("/v1/load_lora_adapter", json={**load_b, "lora_path": str(tmp_path / "nope")}, headers=auth)
        assert bad.status_code == 400 and "PEFT adapter folder" in bad.json()["error"]["message"]
        assert c.post("/v1/load_lora_adapter", json=load_b, headers=auth).status_code == 200
        assert c.post("/v1/completions", json={**body, "model": "b"}, headers=auth).status_code == 200
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "b"}, headers=auth).status_code == 200
        assert c.post("/v1/completions", json={**body, "model": "b"}, headers=auth).status_code == 404
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "b"}, headers=auth).status_code == 404
    with TestClient(create_app(llama, model_name="tiny")) as c:  # no API key: no admin routes
        closed = c.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(tmp_path / "b")})
        assert closed.status_code == 403 and "--api-key" in closed.json()["error"]["message"]


def test_serve_flag_lora_is_name_equals_path():
    from llamaforge.cli.common import UsageError
    from llamaforge.cli.serve import parse_loras

    assert parse_loras(["a=/x", "b=/y=z"]) == [("a", "/x"), ("b", "/y=z")]
    for bad in (["/x"], ["=x"], ["a="], ["a=/x", "a=/y"]):
        with pytest.raises(UsageError, match="--lora"):
            parse_loras(bad)
