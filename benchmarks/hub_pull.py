"""Model references: download throughput over loopback, and the cost of resolving a cached reference.

    python benchmarks/hub_pull.py [--mb 256]

Serves one random "GGUF" file of --mb MiB from the loopback Hub of the tests (tests/hub_server.py: the
model-info endpoint, a 302 to a CDN origin, Range), pulls it with `llamaforge.hub.pull` (huggingface_hub's
downloader + llamaforge's SHA-256 check) into a temporary HF_HUB_CACHE, then times `resolve_model` of the
now cached reference (no network call). Loopback has no network latency or bandwidth limit, but the server is
Python's http.server in the same process (sharing the GIL), so the pull figure is a floor of the client's
own speed (download + hash), not what a user's line gives.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.hub_server import FakeHub  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=256, help="size of the served file in MiB (default 256)")
    args = parser.parse_args()
    data = b"GGUF" + os.urandom(args.mb * 2**20 - 4)
    hub = FakeHub()
    hub.add_repo("bench/big-GGUF", {"big-Q8_0.gguf": data})
    hub.start()
    with tempfile.TemporaryDirectory() as cache:
        os.environ.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=cache)
        from llamaforge.hub import pull, resolve_model

        start = time.perf_counter()
        pulled = pull("bench/big-GGUF:Q8_0", progress=False)
        seconds = time.perf_counter() - start
        assert pulled.downloaded == len(data)
        hub.stop()
        n = 200
        start = time.perf_counter()
        for _ in range(n):
            resolve_model("bench/big-GGUF:Q8_0")
        cached_ms = (time.perf_counter() - start) / n * 1e3
    print(f"pull {args.mb} MiB over loopback: {seconds:.2f} s ({args.mb / seconds:.0f} MiB/s, including the SHA-256 check)")
    print(f"resolve a cached reference (no network): {cached_ms:.2f} ms")


if __name__ == "__main__":
    main()
