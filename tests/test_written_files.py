"""Files llamaforge writes, as the tools that read them after us see them: permissions and torn writes.

Failed before its fix: safetensors' `save_file` (0.7+) creates its file 0600, so an HF folder or a PEFT
adapter written by `llamaforge convert --to hf` / `train` could not be read by another user (a service
account, a container, a shared model folder) while the GGUF and .pth files beside them were 0644.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from llamaforge.checkpoints import load, save_gguf, save_hf, save_meta
from llamaforge.checkpoints.adapters import Adapter, save_peft
from tests.test_checkpoints import random_state_dict, tiny_args


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("shard_bytes", [None, 20_000])
def test_every_file_of_a_written_folder_follows_the_umask(umask_022, tmp_path, shard_bytes):
    args = tiny_args()
    sd = random_state_dict(args)
    hf = save_hf(args, sd, tmp_path / "hf", max_shard_bytes=shard_bytes)
    meta = save_meta(args, sd, tmp_path / "meta")
    gguf = save_gguf(args, sd, tmp_path / "m.gguf")
    assert any(name.endswith(".safetensors") for name in modes(hf))
    for folder in (hf, meta):
        assert set(modes(folder).values()) == {umask_022}, modes(folder)
    assert stat.S_IMODE(gguf.stat().st_mode) == umask_022
    assert stat.S_IMODE(hf.stat().st_mode) == 0o755
    r = 4
    wq = (torch.zeros(r, args.dim), torch.zeros(args.dim, r))
    adapter = Adapter({"layers.0.attention.wq": wq}, alpha=8.0, rank=r)
    peft = save_peft(adapter, args, tmp_path / "lora")
    assert set(modes(peft).values()) == {umask_022}, modes(peft)


def test_a_killed_write_leaves_no_file_under_the_final_name(tmp_path):
    """A process killed in the middle of writing a GGUF (SIGKILL: no cleanup runs) leaves at most a hidden
    temporary file beside the target, never a partial file under the target's name; the next write works."""
    out = tmp_path / "m.gguf"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from llamaforge.checkpoints import save_gguf
        from tests.test_checkpoints import random_state_dict, tiny_args
        def killed(*a, **k):  # the last step of an atomic write: die just before it
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace = killed
        args = tiny_args()
        save_gguf(args, random_state_dict(args), {str(out)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not out.exists()
    left = [p.name for p in tmp_path.iterdir()]
    assert all(name.startswith(".m.gguf.") for name in left), left
    args = tiny_args()
    save_gguf(args, random_state_dict(args), out)
    assert load(out).format == "gguf"


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_a_gguf_lora_for_a_qwen_base_is_what_llama_cpp_applies(kind, tmp_path):
    """Failed before its fix: the GGUF LoRA file always said `llama` (llama.cpp refuses an adapter whose
    architecture is not the model's) and kept B of wq / wk in Meta's rows where qwen2 / qwen3 GGUF weights
    are rotate-half. The reference: transformers' model with the same deltas merged into its weights."""
    from llamaforge.checkpoints.adapters import read_adapter, save_gguf_lora
    from llamaforge.checkpoints.hf import meta_to_hf_qk
    from llamaforge.convert import convert
    from tests.test_architectures import TOKENS, make_hf

    ref = make_hf(kind, tmp_path / "hf", dim=64, hidden=96)
    base = convert(tmp_path / "hf", tmp_path / "f32.gguf", to="gguf", dtype="f32")
    args = load(base).args
    r, gen = 4, torch.Generator().manual_seed(1)
    shapes = {"wq": args.n_heads * args.head_dim, "wk": args.n_kv_heads * args.head_dim,
              "wv": args.n_kv_heads * args.head_dim}
    weights = {f"layers.{i}.attention.{m}": (0.3 * torch.randn(r, args.dim, generator=gen),
                                            0.3 * torch.randn(out, r, generator=gen))
               for i in range(args.n_layers) for m, out in shapes.items()}
    adapter = Adapter(weights, alpha=8.0, rank=r)
    path = save_gguf_lora(adapter, args, tmp_path / "lora.gguf")
    import gguf

    assert gguf.GGUFReader(str(path)).get_field("general.architecture").contents() == kind
    back = read_adapter(path, args)  # llamaforge reads its own file back in Meta's rows
    for k, (a, b) in weights.items():
        assert torch.equal(back.weights[k][0], a) and torch.equal(back.weights[k][1], b), k
    llama_cpp = pytest.importorskip("llama_cpp")
    hf_names = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj"}
    with torch.no_grad():
        for k, (a, b) in weights.items():
            layer, m = int(k.split(".")[1]), k.rsplit(".", 1)[1]
            heads = {"wq": args.n_heads, "wk": args.n_kv_heads}.get(m)
            b_hf = meta_to_hf_qk(b, heads, args.head_dim) if heads else b
            getattr(ref.model.layers[layer].self_attn, hf_names[m]).weight.add_(adapter.alpha / r * b_hf @ a)
        want = ref(TOKENS).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(base), lora_path=str(path), n_ctx=64, logits_all=True, verbose=False,
                          n_threads=1, type_k=0, type_v=0, flash_attn=False)  # float32 cache: exact to 1e-3
    llm.eval(TOKENS[0].tolist())
    got = np.array(llm.scores[: TOKENS.shape[1]])
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
