"""The fused step's attention alone: r verification rows of one sequence, each on its own or together.

    OMP_NUM_THREADS=1 python benchmarks/attention_rows.py [--keys 200] [--kv-type float16] [--repeats 7]

At the default model's attention shape (30 layers x 3 KV heads, 3 query heads each, head_dim 64: 90 distinct
key / value buffers, as a step reads them), rows r = 1..9 at positions keys .. keys + r - 1: "per row" is r
calls of `kv_attend` (what the fused step ran for each row before qattn_rows.h), "together" one call of
`kv_attend_rows` (what it runs now for the rows of one sequence). Both give the same bits (checked here too).
Process CPU milliseconds per 90 buffers (one thread), medians, the two alternated; "call" is a call's own
cost (kv_attend at one key, one query), which the fused step does not pay: per row subtracts r of them,
together one. Not run by the tests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llamaforge import kernels  # noqa: E402
from llamaforge.model import kv_types  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=200)
    p.add_argument("--kv-type", default="float16", choices=["float32", "float16", "bfloat16", "q8_0"])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    ext = kernels.get_extension()
    if ext is None:
        sys.exit("the C++ kernels are not available here")
    buffers, G, hd, n_max = 90, 3, 64, args.keys + 9
    g = torch.Generator().manual_seed(0)
    ks = [kv_types.encode(torch.randn(n_max, hd, generator=g), args.kv_type) for _ in range(buffers)]
    vs = [kv_types.encode(torch.randn(n_max, hd, generator=g), args.kv_type) for _ in range(buffers)]
    tiny_q, tiny_k = torch.randn(1, hd, generator=g), ks[0][:1]

    def clock(fn) -> float:
        t0 = time.process_time()
        fn()
        return (time.process_time() - t0) * 1e3

    call = statistics.median(clock(lambda: [ext.kv_attend(tiny_q, tiny_k, tiny_k) for _ in range(buffers)])
                             for _ in range(args.repeats)) / buffers
    print(f"{args.kv_type} cache, {args.keys} keys, {buffers} buffers; a call's own cost {call * 1e3:.1f} us")
    print("rows  per row (ms)  together (ms)  ratio   (less the calls' own cost)")
    for r in range(1, 10):
        n = [args.keys + i for i in range(r)]
        q = torch.randn(r, G, hd, generator=g)
        kn = [[k[:m] for m in n] for k in ks]
        vn = [[v[:m] for m in n] for v in vs]
        nt = torch.tensor(n)
        for b in range(0, buffers, 30):
            rows = ext.kv_attend_rows(q, ks[b], vs[b], nt)
            assert all(torch.equal(rows[i], ext.kv_attend(q[i], kn[b][i], vn[b][i])) for i in range(r))
        per_row = lambda: [ext.kv_attend(q[i], kn[b][i], vn[b][i]) for b in range(buffers) for i in range(r)]  # noqa: E731
        together = lambda: [ext.kv_attend_rows(q, ks[b], vs[b], nt) for b in range(buffers)]  # noqa: E731
        a, t = [], []
        for _ in range(args.repeats):
            a.append(clock(per_row))
            t.append(clock(together))
        a_ms, t_ms = statistics.median(a), statistics.median(t)
        a_net, t_net = a_ms - r * buffers * call, t_ms - buffers * call
        print(f"{r:4d}  {a_ms:12.3f}  {t_ms:13.3f}  {t_ms / a_ms:5.2f}   {a_net:.3f} / {t_net:.3f} = {t_net / a_net:.2f}")


if __name__ == "__main__":
    main()
