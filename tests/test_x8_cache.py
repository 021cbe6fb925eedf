"""The x8 cache (runtime/x8_cache.py): a model loaded from it is the model loaded cold, bit for bit, and a cache
file that is corrupt, truncated, tampered with or stale is detected, never used, and written again."""

from __future__ import annotations

import errno
import json
import logging
import os
import zlib

import pytest
import torch

from llamaforge import Llama, checkpoints
from llamaforge.kernels import get_extension
from llamaforge.model import Transformer
from llamaforge.runtime import x8_cache
from tests.conftest import block_ggufs

pytestmark = pytest.mark.skipif(get_extension() is None, reason="the x8 layout needs the C++ kernels")

TOKENS = torch.tensor([[1, 7, 42, 3, 99, 5]])
LAST: dict = {}  # path -> the greedy tokens its last build generated


@pytest.fixture(scope="module")
def ggufs(tiny_checkpoints, tmp_path_factory):
    """A Q4_K_M file (Q4_K and Q6_K weights: 256-wide rows) and a Q8_0 one, with the tiny vocabulary."""
    return block_ggufs(tiny_checkpoints, tmp_path_factory.mktemp("x8"), ("q4_k_m", "q8_0"))


@pytest.fixture(params=["xxh3_64", "crc32"])
def cache(tmp_path, monkeypatch, request):
    """The cache in a folder of this test's own, for models of any size, with each checksum."""
    if request.param == "crc32":
        monkeypatch.setattr(x8_cache, "_checksum", lambda: ("crc32", 8, zlib.crc32))
    else:
        pytest.importorskip("xxhash")
    folder = tmp_path / "cache"
    monkeypatch.setenv(x8_cache.ENV, str(folder))
    monkeypatch.setattr(x8_cache, "MIN_BYTES", 0)
    return folder


def logits(path, caplog) -> tuple[torch.Tensor, str]:
    """(the model's logits for TOKENS, what the cache did: "mapped", "wrote" or "none") of a fresh Llama.build."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=x8_cache.__name__):
        llm = Llama.build(path, max_seq_len=32, max_batch_size=1, device="cpu", progress=False)
        with torch.inference_mode():
            out = llm.model(TOKENS, 0)
        LAST[path] = llm.generate([[1, 5, 9]], max_gen_len=6, temperature=0)[0]  # the fused decode step too
    said = " ".join(r.getMessage() for r in caplog.records if r.name == x8_cache.__name__)
    return out, "mapped" if "mapped" in said else "wrote" if "wrote" in said else "none"


def cache_files(folder):
    """The cache files in `folder` (not their stamps)."""
    return sorted(folder.glob("*.x8"))


def only_file(folder):
    files = cache_files(folder)
    assert len(files) == 1, files
    assert set(folder.iterdir()) == {files[0], x8_cache.stamp_path(files[0])}  # and its stamp, nothing else
    return files[0]


@pytest.mark.parametrize("qtype", ["q4_k_m", "q8_0"])
def test_loaded_from_the_cache_equals_loaded_cold(ggufs, cache, caplog, monkeypatch, qtype):
    path = ggufs[0][qtype]
    cold, did = logits(path, caplog)
    cold_tokens = LAST[path]
    assert did == "wrote"
    warm, did = logits(path, caplog)
    assert did == "mapped"
    assert torch.equal(warm, cold) and LAST[path] == cold_tokens
    monkeypatch.setenv(x8_cache.ENV, "off")
    off, did = logits(path, caplog)
    assert did == "none" and torch.equal(off, cold)
    assert len(cache_files(cache)) == 1


@pytest.mark.parametrize("first", [True, False], ids=["the load that writes it", "a later load"])
def test_layers_view_the_mapped_file(ggufs, cache, caplog, first):
    # no copy: the layer's bytes are the file's (a private mapping; its pages are the page cache's), also at the
    # first load, which repacks straight into the file's pages and then maps it as later loads do
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs Linux's /proc/self/maps to see which file a tensor's memory maps")
    path = ggufs[0]["q4_k_m"]
    if not first:
        logits(path, caplog)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=x8_cache.__name__):
        llm = Llama.build(path, max_seq_len=32, max_batch_size=1, device="cpu", progress=False)
    assert ("wrote" if first else "mapped") in caplog.text
    wq = llm.model.layers[0].attention.wq
    assert wq.layout == "x8"
    size = only_file(cache).stat().st_size
    maps = open("/proc/self/maps").read()
    name = str(only_file(cache))
    spans = [line.split()[0].split("-") for line in maps.splitlines() if line.endswith(name)]
    ptr = wq.qweight.data_ptr()
    assert any(int(a, 16) <= ptr < int(b, 16) for a, b in spans), "wq does not view the cache file"
    assert size > wq.qweight.numel()


def test_a_full_disk_is_said_and_the_load_goes_on_from_memory(ggufs, cache, caplog, monkeypatch):
    # The file's space is reserved before any page is written through the mapping: a full disk is an error
    # there (a page written through a mapping on a full disk would be a SIGBUS), the temporary file goes.
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    out, did = logits(ggufs[0]["q8_0"], caplog)
    assert did == "none" and "cannot write" in caplog.text and "No space left" in caplog.text
    assert not cache.exists() or list(cache.iterdir()) == []
    monkeypatch.setenv(x8_cache.ENV, "off")
    ref, _ = logits(ggufs[0]["q8_0"], caplog)
    assert torch.equal(out, ref)


def test_without_fallocate_the_space_is_reserved_by_writing_it(ggufs, cache, caplog, monkeypatch):
    monkeypatch.delattr(os, "posix_fallocate", raising=False)  # as on macOS
    cold, did = logits(ggufs[0]["q8_0"], caplog)
    assert did == "wrote"
    warm, did = logits(ggufs[0]["q8_0"], caplog)
    assert did == "mapped" and torch.equal(warm, cold)
    monkeypatch.setenv(x8_cache.VERIFY_ENV, "1")  # every byte the checksums say
    checked, did = logits(ggufs[0]["q8_0"], caplog)
    assert did == "mapped" and torch.equal(checked, cold) and "every tensor checked" in caplog.text


def corrupt_one_byte(file):
    header = json.loads(file.read_bytes()[16: 16 + int.from_bytes(file.read_bytes()[8:16], "little")])
    name, _, _, _, offset, nbytes, _ = header["tensors"][1]
    with open(file, "r+b") as f:
        f.seek(offset + nbytes // 2)
        byte = f.read(1)
        f.seek(offset + nbytes // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    return name


def truncate(file):
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size - 1)


def tamper_table(file):
    """Shift the second tensor's offset by a page (keeping the header's length): sizes must not come from the file."""
    data = bytearray(file.read_bytes())
    n = int.from_bytes(data[8:16], "little")
    header = json.loads(data[16: 16 + n])
    header["tensors"][1][4] += 4096
    text = json.dumps(header).encode()
    assert len(text) == n
    data[16: 16 + n] = text
    file.write_bytes(bytes(data))


def another_build(file):
    """The same weights as written by other kernels (whose x8 layout may differ): stale."""
    data = bytearray(file.read_bytes())
    n = int.from_bytes(data[8:16], "little")
    header = json.loads(data[16: 16 + n])
    build = header["key"]["build"]
    header["key"]["build"] = build[:-1] + ("0" if build[-1] != "0" else "1")
    data[16: 16 + n] = json.dumps(header).encode()
    file.write_bytes(bytes(data))


def garbage(file):
    file.write_bytes(b"\x00" * 100)


@pytest.mark.parametrize("damage", [corrupt_one_byte, truncate, tamper_table, another_build, garbage])
def test_a_damaged_cache_file_is_detected_and_written_again(ggufs, cache, caplog, damage):
    path = ggufs[0]["q4_k_m"]
    cold, _ = logits(path, caplog)
    damage(only_file(cache))
    again, did = logits(path, caplog)
    assert did == "wrote", "a damaged cache file was used"
    assert torch.equal(again, cold)
    warm, did = logits(path, caplog)  # the file written again is whole
    assert did == "mapped" and torch.equal(warm, cold)


def test_a_changed_model_file_invalidates_its_cache(ggufs, cache, caplog, tmp_path):
    paths, args, vocab = ggufs
    path = tmp_path / "model.gguf"
    path.write_bytes(paths["q8_0"].read_bytes())
    first, _ = logits(path, caplog)
    torch.manual_seed(1)  # other weights, same shapes, same file name
    other = {k: v.detach().clone() for k, v in Transformer(args).state_dict().items()}
    checkpoints.save_gguf(args, other, path, dtype="q8_0", tokenizer_metadata=vocab, overwrite=True)
    changed, did = logits(path, caplog)
    assert did == "wrote"
    assert not torch.equal(changed, first)
    os.environ[x8_cache.ENV] = "off"
    try:
        reference, _ = logits(path, caplog)
    finally:
        os.environ[x8_cache.ENV] = str(cache)
    assert torch.equal(changed, reference)
    os.utime(path)  # even a touch (new mtime and ctime) is a change
    _, did = logits(path, caplog)
    assert did == "wrote"
    assert len(cache_files(cache)) == 1  # one cache file per model path, replaced


def test_an_unwritable_cache_folder_still_loads(ggufs, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(x8_cache.ENV, str(blocker / "x8"))
    monkeypatch.setattr(x8_cache, "MIN_BYTES", 0)
    out, did = logits(ggufs[0]["q8_0"], caplog)
    assert did == "none" and "cannot write" in caplog.text  # said, and the load went on
    monkeypatch.setenv(x8_cache.ENV, "off")
    ref, _ = logits(ggufs[0]["q8_0"], caplog)
    assert torch.equal(out, ref)


def test_small_models_write_no_cache(ggufs, tmp_path, monkeypatch, caplog):
    folder = tmp_path / "cache"
    monkeypatch.setenv(x8_cache.ENV, str(folder))  # MIN_BYTES as shipped: the tiny model is far below it
    logits(ggufs[0]["q8_0"], caplog)
    assert not folder.exists()


def test_cache_files_of_deleted_models_are_pruned_by_the_next_write(ggufs, cache, caplog, tmp_path):
    paths, _, _ = ggufs
    doomed = tmp_path / "doomed.gguf"
    doomed.write_bytes(paths["q8_0"].read_bytes())
    logits(doomed, caplog)
    (doomed_cache,) = cache_files(cache)
    leftover = cache / f".{doomed_cache.name}.abcd.tmp"  # what a writer killed mid-way leaves
    leftover.write_bytes(b"partial")
    os.utime(leftover, (0, 0))
    doomed.unlink()
    _, did = logits(paths["q4_k_m"], caplog)  # another model's first load writes its cache file...
    assert did == "wrote"
    remaining = only_file(cache)  # ...and prunes the deleted model's file, its stamp and the old leftover
    assert remaining != doomed_cache and not leftover.exists()


def test_checkouts_with_other_kernels_sharing_a_folder_keep_their_own_files(ggufs, cache, caplog, monkeypatch):
    """Each kernel build has its own file per model (none rewrites another's); a write keeps the files used last."""
    path = ggufs[0]["q8_0"]
    real = x8_cache._build_name

    def load_as(build):
        monkeypatch.setattr(x8_cache, "_build_name", lambda ext: f"{real(ext)}-{build}")
        return logits(path, caplog)

    a, did_a = load_as("a")
    b, did_b = load_as("b")
    assert (did_a, did_b) == ("wrote", "wrote") and len(cache_files(cache)) == 2
    assert torch.equal(a, b)
    os.utime(x8_cache.stamp_path(x8_cache.cache_path(path, cache, f"{real(get_extension())}-b")),
             (1, 1))  # b's file looks old (its stamp's mtime says when it was used last)...
    assert load_as("a")[1] == "mapped"  # ...a's file is a's, untouched by b, and now marked used
    assert load_as("c")[1] == "wrote"  # a third build: the model's file used longest ago (b's) goes
    kept = set(cache_files(cache))
    assert kept == {x8_cache.cache_path(path, cache, f"{real(get_extension())}-{x}") for x in ("a", "c")}
    assert load_as("a")[1] == "mapped" and load_as("c")[1] == "mapped"


def test_cache_path_defaults_to_these_kernels(ggufs, cache, caplog):
    """benchmarks/matrix.py names a model's cache file with cache_path(gguf, folder): the file a load writes."""
    path = ggufs[0]["q8_0"]
    assert logits(path, caplog)[1] == "wrote"
    assert cache_files(cache) == [x8_cache.cache_path(path, cache)]


def counting_sums(monkeypatch):
    """Count the loads that check every tensor's checksum (calls of x8_cache._sums)."""
    calls = []
    real = x8_cache._sums
    monkeypatch.setattr(x8_cache, "_sums", lambda views: calls.append(len(views)) or real(views))
    return calls


def test_a_cache_file_unchanged_since_its_check_is_not_checked_again_unless_asked(ggufs, cache, caplog, monkeypatch):
    path = ggufs[0]["q4_k_m"]
    calls = counting_sums(monkeypatch)
    cold, did = logits(path, caplog)
    assert did == "wrote" and calls == []  # the sums of the bytes just written go into the file and its stamp
    warm, did = logits(path, caplog)
    assert did == "mapped" and calls == [] and torch.equal(warm, cold)
    monkeypatch.setenv(x8_cache.VERIFY_ENV, "1")
    checked, did = logits(path, caplog)
    assert did == "mapped" and len(calls) == 1 and calls[0] > 1 and torch.equal(checked, cold)


def restamp(file):
    """Rewrite the stamp as if `file`'s bytes had been checked as they are now (what bit rot under an
    unchanged identity would look like to the stat check)."""
    stamp = x8_cache.stamp_path(file)
    seal = json.loads(stamp.read_text())
    seal["identity"] = x8_cache._identity(file.stat())
    stamp.write_text(json.dumps(seal))


def keep_mtime(damage):
    def damaged(file):
        st = file.stat()
        damage(file)
        os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))  # the ctime still moves
    return damaged


def stamp_garbage(file):
    x8_cache.stamp_path(file).write_bytes(b"\xff" * 10)


def stamp_missing(file):
    x8_cache.stamp_path(file).unlink()


def stamp_of_another_header(file):
    stamp = x8_cache.stamp_path(file)
    seal = json.loads(stamp.read_text())
    seal["header"] = "0" * 64
    stamp.write_text(json.dumps(seal))


@pytest.mark.parametrize("damage", [keep_mtime(corrupt_one_byte), keep_mtime(another_build)])
def test_a_write_that_keeps_the_mtime_is_still_a_change(ggufs, cache, caplog, damage):
    path = ggufs[0]["q4_k_m"]
    cold, _ = logits(path, caplog)
    damage(only_file(cache))
    again, did = logits(path, caplog)
    assert did == "wrote" and torch.equal(again, cold)


def test_verify_finds_damage_the_identity_does_not_show(ggufs, cache, caplog, monkeypatch):
    path = ggufs[0]["q8_0"]
    cold, _ = logits(path, caplog)
    file = only_file(cache)
    corrupt_one_byte(file)
    restamp(file)
    monkeypatch.setenv(x8_cache.VERIFY_ENV, "1")
    again, did = logits(path, caplog)
    assert did == "wrote" and torch.equal(again, cold)
    assert "fails its" in caplog.text


@pytest.mark.parametrize("damage", [stamp_garbage, stamp_missing, stamp_of_another_header])
def test_a_stamp_that_does_not_match_means_a_full_check(ggufs, cache, caplog, monkeypatch, damage):
    path = ggufs[0]["q4_k_m"]
    cold, _ = logits(path, caplog)
    calls = counting_sums(monkeypatch)
    damage(only_file(cache)) if damage is not stamp_missing else damage(cache_files(cache)[0])
    checked, did = logits(path, caplog)
    assert did == "mapped" and len(calls) == 1 and torch.equal(checked, cold)
    trusted, did = logits(path, caplog)  # the check wrote a good stamp
    assert did == "mapped" and len(calls) == 1 and torch.equal(trusted, cold)


def test_a_trusted_load_marks_its_stamp_used_without_rewriting_it(ggufs, cache, caplog):
    """A load whose file is unchanged since its last check only sets the stamp's mtime (what `prune` orders by):
    no new stamp file renamed over the old one (same inode, same bytes), so no rename waits for the disk."""
    path = ggufs[0]["q8_0"]
    logits(path, caplog)
    stamp = x8_cache.stamp_path(only_file(cache))
    os.utime(stamp, (1, 1))
    before, text = stamp.stat(), stamp.read_bytes()
    _, did = logits(path, caplog)
    after = stamp.stat()
    assert did == "mapped" and "unchanged since its last check" in caplog.text
    assert after.st_ino == before.st_ino and stamp.read_bytes() == text
    assert after.st_mtime > 1000
