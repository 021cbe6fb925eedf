"""Model references end to end against a Hub on loopback (tests/hub_server.py), with the real huggingface_hub.

A tiny GGUF repository (Q8_0 and F32 files written by the production saver), a tiny safetensors Llama and a
gated repository are served over HTTP; HF_ENDPOINT points at the server and HF_HUB_CACHE at a temporary
folder. No test needs the internet.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llamaforge import checkpoints
from llamaforge.cli.main import main as cli
from llamaforge.convert import sentencepiece_gguf_metadata
from llamaforge.errors import CheckpointNotFoundError, HubError
from llamaforge.hub import list_models, plan_removal, pull, resolve_model
from tests.hub_server import FakeHub

GGUF_REPO = "tiny-org/tiny-llama-GGUF"
HF_REPO = "tiny-org/tiny-llama"
GATED_REPO = "tiny-org/gated-GGUF"
TOKEN = "hf_test_token"


@pytest.fixture(scope="module")
def repo_files(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("hubfiles")
    meta = sentencepiece_gguf_metadata(tiny_checkpoints.tokenizer)
    q8 = checkpoints.save_gguf(tiny_checkpoints.args, tiny_checkpoints.state_dict, root / "q8.gguf",
                               tokenizer_metadata=meta, dtype="q8_0")
    f32 = tiny_checkpoints.gguf
    gguf = {"tiny-llama-Q8_0.gguf": q8.read_bytes(), "tiny-llama-F32.gguf": f32.read_bytes(),
            "README.md": b"# tiny llama\n"}
    hf = {p.name: p.read_bytes() for p in Path(tiny_checkpoints.hf).iterdir() if p.is_file()}
    hf["README.md"] = b"# tiny llama, safetensors\n"
    return {GGUF_REPO: gguf, HF_REPO: hf}


@pytest.fixture()
def hub(repo_files, tmp_path, monkeypatch):
    server = FakeHub()
    server.add_repo(GGUF_REPO, repo_files[GGUF_REPO])
    server.add_repo(HF_REPO, repo_files[HF_REPO])
    server.add_repo(GATED_REPO, {"gated-Q8_0.gguf": repo_files[GGUF_REPO]["tiny-llama-Q8_0.gguf"]}, token=TOKEN)
    server.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # loopback never goes through a proxy of the CI's
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token (for subprocesses)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))  # in-process
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: a test that imported it while the variable was set
    # (test_cli's offline reference test, when it runs first) would leave every later download refused
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    yield server
    server.stop()


def test_pull_gguf_by_quant_fetches_one_checked_file_into_the_hf_cache(hub, repo_files, tmp_path):
    pulled = pull(f"{GGUF_REPO}:q8_0", progress=False)
    assert pulled.format == "gguf" and pulled.quant == "Q8_0"
    assert pulled.path.name == "tiny-llama-Q8_0.gguf"
    assert pulled.path.read_bytes() == repo_files[GGUF_REPO]["tiny-llama-Q8_0.gguf"]
    assert pulled.downloaded == len(repo_files[GGUF_REPO]["tiny-llama-Q8_0.gguf"])
    # huggingface_hub's cache layout: a snapshot link to a blob named by the SHA-256, refs/main -> commit
    folder = tmp_path / "hf-cache" / "models--tiny-org--tiny-llama-GGUF"
    sha = hashlib.sha256(repo_files[GGUF_REPO]["tiny-llama-Q8_0.gguf"]).hexdigest()
    assert pulled.path.resolve() == (folder / "blobs" / sha).resolve()
    assert (folder / "refs" / "main").read_text() == hub.repos[GGUF_REPO].commit
    assert hub.gets("tiny-llama-Q8_0.gguf") and not hub.gets("tiny-llama-F32.gguf") and not hub.gets("README.md")
    again = pull(f"{GGUF_REPO}:Q8_0", progress=False)
    assert again.downloaded == 0 and again.path == pulled.path


def test_no_quant_picks_the_default_and_safetensors_repos_get_config_tokenizer_weights(hub, repo_files):
    assert pull(GGUF_REPO, progress=False).quant == "Q8_0"  # no Q4_K_M: the smallest of >= 4 bits
    pulled = pull(HF_REPO, progress=False)
    assert pulled.format == "hf" and pulled.path.is_dir()
    names = sorted(p.name for p in pulled.path.iterdir())
    assert names == sorted(n for n in repo_files[HF_REPO] if n != "README.md")
    assert checkpoints.load(pulled.path, progress=False).format == "hf"


def test_resume_after_a_cut_connection(hub, repo_files, monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub keeps what arrived in whole chunks (10 MB); 64 KiB ones make a tiny file behave as a big one
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    name = "tiny-llama-F32.gguf"
    hub.cut_once.add(name)
    pulled = pull(f"{GGUF_REPO}:F32", progress=False)
    assert pulled.path.read_bytes() == repo_files[GGUF_REPO][name]
    gets = hub.gets(name)
    assert len(gets) == 2 and "range" not in gets[0]
    resumed_at = int(gets[1]["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(repo_files[GGUF_REPO][name]) // 2  # the second request asks only for the rest


@pytest.mark.parametrize("ref, name, kind", [(f"{GGUF_REPO}:F32", "tiny-llama-F32.gguf", "SHA-256"),
                                             (HF_REPO, "config.json", "git blob id")])
def test_a_download_that_does_not_match_the_hubs_hash_is_deleted(hub, repo_files, ref, name, kind):
    from huggingface_hub import try_to_load_from_cache

    from tests.hub_server import LFS_THRESHOLD

    repo = ref.split(":")[0]
    assert (len(repo_files[repo][name]) > LFS_THRESHOLD) == (kind == "SHA-256")  # an LFS file, or a plain one
    hub.corrupt.add(name)
    with pytest.raises(HubError, match=f"{name} of {ref} was downloaded but its {kind} is .* not the Hub's"):
        pull(ref, progress=False)
    cached = try_to_load_from_cache(repo, name, cache_dir=os.environ["HF_HUB_CACHE"], revision=hub.repos[repo].commit)
    assert not isinstance(cached, str)  # neither the link nor the blob is left


def test_build_by_reference_generates_and_loads_offline_with_no_network(hub, tiny_checkpoints, monkeypatch):
    from llamaforge import Llama

    prompt = [[1, 5, 9, 12]]
    by_ref = Llama.build(f"{GGUF_REPO}:Q8_0", progress=False)
    expected = Llama.build(str(by_ref.source), progress=False).generate(prompt, max_gen_len=6, temperature=0)[0]
    tokens, _ = by_ref.generate(prompt, max_gen_len=6, temperature=0)
    assert tokens == expected and len(tokens[0]) == 6
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*a, **k):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    offline = Llama.build(f"{GGUF_REPO}:Q8_0", progress=False)
    assert offline.generate(prompt, max_gen_len=6, temperature=0)[0] == expected
    with pytest.raises(CheckpointNotFoundError, match="HF_HUB_OFFLINE is set"):
        resolve_model(f"{GGUF_REPO}:F32")


def test_a_tag_is_recorded_in_the_cache_and_found_offline(hub, monkeypatch):
    commit = hub.repos[GGUF_REPO].commit
    hub.repos[GGUF_REPO].branches["v1.0"] = commit
    tagged = pull(f"{GGUF_REPO}:Q8_0@v1.0", progress=False)
    assert tagged.commit == commit
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model(f"{GGUF_REPO}:Q8_0@v1.0") == tagged.path
    assert resolve_model(f"{GGUF_REPO}:Q8_0@{commit}") == tagged.path
    with pytest.raises(CheckpointNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model(f"{GGUF_REPO}:Q8_0@v2.0")


def test_generate_training_spacy_and_info_take_references(hub, capsys):
    import torch

    from llamaforge.integrations.models import load_llama
    from llamaforge.training.modeling import load_for_training

    model, tokenizer, _ = load_for_training(f"{GGUF_REPO}:Q8_0", None, torch.device("cpu"), 16, progress=False)
    assert model.args.n_layers == 2 and tokenizer.n_words > 0
    assert load_llama(HF_REPO, device="cpu").checkpoint_format == "hf"
    assert cli(["info", "--json", f"{GGUF_REPO}:F32"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["format"] == "gguf" and described["path"].endswith("tiny-llama-F32.gguf")
    assert cli(["generate", f"{GGUF_REPO}:Q8_0", "-p", "hello", "--temperature", "0", "-n", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_errors_missing_repo_revision_quant_gated_and_no_network(hub, monkeypatch):
    with pytest.raises(CheckpointNotFoundError, match="no model 'tiny-org/nope' on the Hub"):
        resolve_model("tiny-org/nope")
    with pytest.raises(CheckpointNotFoundError, match="has no revision 'v9'"):
        resolve_model(f"{GGUF_REPO}@v9")
    with pytest.raises(CheckpointNotFoundError, match="no Q4_K_M GGUF file; it has: F32, Q8_0"):
        resolve_model(f"{GGUF_REPO}:Q4_K_M")
    with pytest.raises(HubError, match="gated repository.*set HF_TOKEN"):
        resolve_model(GATED_REPO)
    monkeypatch.setenv("HF_TOKEN", "hf_someone_elses")
    with pytest.raises(HubError, match="gated repository.*check that your token"):
        resolve_model(GATED_REPO)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert resolve_model(GATED_REPO).name == "gated-Q8_0.gguf"
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(HubError, match="cannot reach the Hub at http://127.0.0.1:9"):
        resolve_model(f"{HF_REPO}@main")


def test_cli_list_rm_and_show(hub, capsys, monkeypatch):
    pull(f"{GGUF_REPO}:Q8_0", progress=False)
    pull(f"{GGUF_REPO}:F32", progress=False)
    pull(HF_REPO, progress=False)
    assert cli(["list", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert set(listed) == {f"{GGUF_REPO}:Q8_0", f"{GGUF_REPO}:F32", HF_REPO}
    assert listed[f"{GGUF_REPO}:Q8_0"]["format"] == "gguf" and listed[HF_REPO]["format"] == "hf"
    assert listed[f"{GGUF_REPO}:Q8_0"]["size"] == Path(listed[f"{GGUF_REPO}:Q8_0"]["path"]).stat().st_size
    assert cli(["list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "FORMAT", "QUANT", "SIZE", "WHERE"]
    assert any(line.startswith(f"{GGUF_REPO}:Q8_0 ") and " gguf " in line and " Q8_0 " in line for line in table)

    assert cli(["show", f"{GGUF_REPO}:Q8_0"]) == 0
    shown = capsys.readouterr().out
    assert f"reference:   {GGUF_REPO}:Q8_0" in shown and "format:      gguf" in shown

    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # not a terminal: rm needs --yes
    assert cli(["rm", f"{GGUF_REPO}:F32"]) == 1
    assert "pass --yes" in capsys.readouterr().err
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)  # a terminal: rm asks, and "no" keeps the files
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert cli(["rm", f"{GGUF_REPO}:F32"]) == 1
    assert "tiny-llama-F32.gguf" in capsys.readouterr().out and len(list_models()) == 3
    assert cli(["rm", "-y", f"{GGUF_REPO}:F32"]) == 0
    assert {m.name for m in list_models()} == {f"{GGUF_REPO}:Q8_0", HF_REPO}
    assert cli(["rm", "--yes", HF_REPO]) == 0
    assert {m.name for m in list_models()} == {f"{GGUF_REPO}:Q8_0"}
    with pytest.raises(CheckpointNotFoundError, match="not in the cache"):
        plan_removal(HF_REPO)
    assert cli(["rm", "-y", f"{GGUF_REPO}:Q4_0"]) == 1
    assert "cached quants: Q8_0" in capsys.readouterr().err


def test_rm_of_one_quant_keeps_the_others_without_delete_files(hub, monkeypatch):
    from huggingface_hub.utils import HFCacheInfo

    q8 = pull(f"{GGUF_REPO}:Q8_0", progress=False).path
    f32 = pull(f"{GGUF_REPO}:F32", progress=False).path
    if hasattr(HFCacheInfo, "delete_files"):  # the fallback for huggingface_hub releases that lack it
        monkeypatch.delattr(HFCacheInfo, "delete_files")
    removal = plan_removal(f"{GGUF_REPO}:F32")
    assert removal.freed == f32.stat().st_size
    blob = f32.resolve()
    removal.execute()
    assert not f32.exists() and not blob.exists() and q8.is_file()


def test_cli_pull_in_a_fresh_process_reads_the_environment_and_shows_progress(hub, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-m", "llamaforge.cli.main", "pull", f"{GGUF_REPO}:Q8_0"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "tiny-llama-Q8_0.gguf" in run.stderr and "100%" in run.stderr  # tqdm's bar, in bytes
    path = Path(run.stdout.strip().splitlines()[-1])
    assert path.is_file() and str(path).startswith(str(tmp_path / "hf-cache"))
    bad = subprocess.run([sys.executable, "-m", "llamaforge.cli.main", "pull", f"{GGUF_REPO}:Q5_K_M"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "has no Q5_K_M GGUF file; it has: F32, Q8_0" in bad.stderr


def test_concurrent_pulls_of_one_file_in_one_process_all_succeed_with_one_download(hub, repo_files):
    """Threads pulling one reference (a server's requests, parallel builds) share huggingface_hub's lock
    and the one transfer; the revision file each writes must not collide (its temporary name was the pid's
    alone: two of four threads failed with FileNotFoundError)."""
    import threading

    name = "tiny-llama-F32.gguf"
    results: list = []
    barrier = threading.Barrier(6)

    def one() -> None:
        barrier.wait()
        for _ in range(5):  # each pull writes the revision file, cached or not
            try:
                path = pull(f"{GGUF_REPO}:F32", progress=False).path
                results.append(path.read_bytes() == repo_files[GGUF_REPO][name])
            except Exception as exc:  # noqa: BLE001 - collected, the assert shows it
                results.append(repr(exc))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 30
    assert len(hub.gets(name)) == 1


@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "free some space"), (errno.EACCES, "make it writable"),
                                        (errno.EROFS, "writable file system")])
def test_a_cache_that_cannot_be_written_is_a_clear_error_naming_the_cache(hub, monkeypatch, capsys, err, words):
    """Disk full, no permission, read-only: the CLI says so and what to do (was a traceback of an OSError)."""
    import huggingface_hub.file_download

    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err), "blob.incomplete")

    monkeypatch.setattr(huggingface_hub.file_download, "http_get", fail)
    assert cli(["pull", f"{GGUF_REPO}:F32"]) == 1
    message = capsys.readouterr().err
    assert "tiny-llama-F32.gguf" in message and os.environ["HF_HUB_CACHE"] in message
    assert os.strerror(err) in message and words in message and "Traceback" not in message
    with pytest.raises(HubError, match=words):
        pull(f"{GGUF_REPO}:F32", progress=False)
