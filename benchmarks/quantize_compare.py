"""`llamaforge quantize` against llama.cpp's llama_model_quantize on the default model: same bytes? how long?

    python benchmarks/quantize_compare.py [--type q4_k_m] [--model FILE.gguf]

Needs llama-cpp-python (benchmarks/setup_peers.sh builds it; any install works). Quantizes the model
with both, each allowed to requantize (the default model is Q4_1), and reports the wall time of each and
how many tensors are byte-identical with the same ggml type. Not run by the tests.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from llamaforge.checkpoints import quantize_gguf
from llamaforge.checkpoints.gguf import read_gguf
from llamaforge.checkpoints.gguf_write import FILE_TYPES
from llamaforge.default_model import default_model_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--type", default="q4_k_m", choices=[k for k, v in FILE_TYPES.items() if v[2]])
    p.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    args = p.parse_args()
    import llama_cpp
    from gguf.constants import LlamaFileType

    model = Path(args.model or default_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        ours_path, theirs_path = Path(tmp) / "ours.gguf", Path(tmp) / "theirs.gguf"
        t = time.perf_counter()
        quantize_gguf(model, ours_path, args.type, allow_requantize=True)
        ours_s = time.perf_counter() - t
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LlamaFileType[FILE_TYPES[args.type][0]].value
        params.allow_requantize = True
        t = time.perf_counter()
        if llama_cpp.llama_model_quantize(str(model).encode(), str(theirs_path).encode(), params) != 0:
            raise SystemExit("llama_model_quantize failed")
        theirs_s = time.perf_counter() - t
        ours, theirs = read_gguf(ours_path), read_gguf(theirs_path)
        same = [n for n, i in theirs.tensors.items() if n in ours.tensors and ours.tensors[n].qtype == i.qtype
                and bytes(ours.raw(ours.tensors[n]).numpy()) == bytes(theirs.raw(i).numpy())]
        print(f"{model.name} -> {args.type}: llamaforge {ours_s:.1f} s, llama.cpp {theirs_s:.1f} s "
              f"(threads {params.nthread or 'all'}); {len(same)} of {len(theirs.tensors)} tensors byte-identical; "
              f"sizes {ours_path.stat().st_size} / {theirs_path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
