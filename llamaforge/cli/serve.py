"""`llamaforge serve`: an OpenAI-compatible HTTP server (and a chat page at /) with continuous batching.

Under `torchrun --nproc_per_node N -m llamaforge.cli.main serve MODEL` one tensor-parallel model is served:
rank 0 listens and runs the engine, the other ranks run the same model calls (generation/mirror.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

from llamaforge.cli.common import add_model_flags, build_from_flags
from llamaforge.errors import LlamaforgeError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API", description=__doc__)
    add_model_flags(p, max_seq_len=None, max_batch_size=8)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the file name)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot before 429s")
    p.add_argument("--prefill-budget", type=int, default=256,
                   help="most prompt tokens computed between two decode steps (default 256)")
    p.add_argument("--no-prefix-reuse", action="store_true", help="never reuse cached prompt prefixes")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds running requests get to finish on Ctrl-C before they are cancelled")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve the PEFT LoRA adapter folder PATH as model NAME over the same base (repeatable); "
                        "requests with different adapters share batches")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    p.set_defaults(run=run)


def parse_loras(values: list[str]) -> list[tuple[str, str]]:
    """--lora NAME=PATH values -> [(name, path)]; ValueError saying what is wrong."""
    out = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path:
            raise ValueError(f"--lora takes NAME=PATH (a model id, then a PEFT adapter folder), got {value!r}")
        if name in {n for n, _ in out}:
            raise ValueError(f"--lora names {name!r} twice; give each adapter its own name")
        out.append((name, path))
    return out


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from llamaforge.server.app import create_app
    except ImportError as exc:
        print(f"error: serving needs FastAPI and uvicorn ({exc}); pip install 'llamaforge[serve]'", file=sys.stderr)
        return 2
    for name, value in (("--max-batch-size", args.max_batch_size), ("--max-queue", args.max_queue),
                        ("--prefill-budget", args.prefill_budget)):
        if value < 1:
            print(f"error: {name} must be at least 1, got {value}", file=sys.stderr)
            return 2
    try:
        loras = parse_loras(args.lora)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    llama = build_from_flags(args)
    if llama.world > 1 and llama.rank > 0:  # torchrun: rank 0 serves, the others run its model calls
        llama.follow()
        return 0
    for name, path in loras:
        try:
            llama.load_adapter(name, path)
        except LlamaforgeError as exc:
            print(f"error: --lora {name}={path}: {exc}", file=sys.stderr)
            return 2
    logging.getLogger("llamaforge").setLevel(logging.INFO)
    app = create_app(
        llama, model_name=args.served_model_name, api_key=args.api_key, n_slots=args.max_batch_size,
        max_queue=args.max_queue, prefill_budget=args.prefill_budget, prefix_reuse=not args.no_prefix_reuse,
    )
    adapters = f" with LoRA adapters {', '.join(n for n, _ in loras)}" if loras else ""
    print(f"llamaforge: serving {app.state.model_name}{adapters} on http://{args.host}:{args.port} "
          f"(chat page at /, OpenAI API at /v1)", flush=True)
    grace = max(0.0, args.shutdown_timeout - 0.5)  # leave uvicorn time to send the streams' ends

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.served.begin_shutdown(grace)  # running requests end with an error event and [DONE]
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    try:
        Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has shut down
        pass
    finally:
        llama.stop_followers()  # the engine is closed: let the other ranks of a torchrun launch end
    return 0
