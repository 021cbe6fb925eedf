"""The x8 repack alone (kernels/qx8.h): what a model's first load spends turning GGUF blocks into the kernels' layout.

    python benchmarks/repack_speed.py --shape 1b --types Q4_K_M,Q5_K_M,Q6_K,Q8_0,Q4_0 --threads 1

For each file (benchmarks/shapes.py's, which compare.py --shape makes), every weight with an x8 layout but the
token embedding (looked up row by row, never repacked) is read from the mapped file once (its pages faulted in),
then repacked `--repeats` times; prints the best time and GB/s of GGUF bytes. `python benchmarks/load_speed.py`
times a whole load (its "llamaforge" variant repacks every weight). Not run by the tests.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1b", choices=("1b", "3b", "8b"))
    p.add_argument("--types", type=lambda s: s.split(","), default=["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    import warnings

    import gguf
    import numpy as np
    import torch

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read, never written

    from llamaforge import kernels
    from shapes import file_path

    torch.set_num_threads(a.threads)
    if kernels.get_extension() is None:
        sys.exit("repack_speed: the C++ kernels did not build here (see llamaforge/kernels/loader.py)")
    for t in a.types:
        path = file_path(a.shape, t)
        if not path.exists():
            sys.exit(f"repack_speed: {path} is not made; run `python benchmarks/shapes.py {a.shape} --types {t}`")
        weights = []
        for x in gguf.GGUFReader(path).tensors:
            if x.tensor_type.name in kernels.X8_FORMATS and x.name != "token_embd.weight":
                n, k = int(x.shape[1]), int(x.shape[0])
                raw = torch.from_numpy(np.ascontiguousarray(x.data).reshape(n, -1))
                weights.append((raw, x.tensor_type.name, n, k))
        for raw, *_ in weights:
            raw.sum()  # fault the file's pages in: the repack is timed, not the disk
        best = float("inf")
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            for raw, qtype, n, k in weights:
                kernels.repack(raw, qtype, n, k)
            best = min(best, time.perf_counter() - t0)
        gb = sum(raw.numel() for raw, *_ in weights) / 1e9
        print(f"{a.shape} {t:<7} {gb:.2f} GB repacked in {best:.3f} s ({gb / best:.2f} GB/s), {a.threads} thread(s)",
              flush=True)


if __name__ == "__main__":
    main()
