"""`llamaforge serve`: an OpenAI-compatible HTTP server (and a chat page at /) with continuous batching.

Under `torchrun --nproc_per_node N -m llamaforge.cli.main serve MODEL` one tensor-parallel model is served:
rank 0 listens and runs the engine, the other ranks run the same model calls (generation/mirror.py).
The port is checked before the model loads. The KV cache is a pool of blocks of 64 positions that the
running sequences (at most `--max-batch-size`) draw from as they grow, sized from a memory budget:
`--kv-memory` (e.g. 2GiB, 512MB), by default a tenth of the memory free once the model is loaded; many
short or a few long requests fit in it. The context of one sequence is the model's own, cut to what the
whole pool holds. The choice is printed at start.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Optional

from llamaforge.cli.common import UsageError, add_model_flags, build_from_flags, check_port_free, describe_size
from llamaforge.errors import LlamaforgeError

KV_MEMORY_FRACTION = 0.1  # of the memory free after loading, when --kv-memory is not given
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API", description=__doc__)
    add_model_flags(p, max_seq_len=None, max_batch_size=8)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--kv-memory", "--kv_memory", dest="kv_memory", default=None, metavar="SIZE",
                   help="memory for the KV cache's block pool, shared by all running sequences, e.g. 2GiB or "
                        "512MB (default: a tenth of the memory free after loading)")
    p.add_argument("--api-key", "--api_key", dest="api_key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: no key)")
    p.add_argument("--served-model-name", "--served_model_name", dest="served_model_name", default=None,
                   help="model id clients use (default: the file name)")
    p.add_argument("--max-queue", "--max_queue", dest="max_queue", type=int, default=64,
                   help="requests that may wait for a slot before new ones get 429")
    p.add_argument("--max-num-batched-tokens", "--max_num_batched_tokens", "-b", "--batch-size", "--prefill-budget",
                   dest="max_num_batched_tokens", type=int, default=256, metavar="N",
                   help="tokens of one engine step: a token for each running answer first, then prompt tokens, "
                        "oldest prompt first (vLLM's --max-num-batched-tokens, llama-server's --batch-size; at "
                        "least one 64-token prompt chunk per step). Lower: steadier tokens of running answers "
                        "while prompts arrive; higher: earlier first tokens of long prompts")
    p.add_argument("--no-prefix-reuse", "--no_prefix_reuse", dest="no_prefix_reuse", action="store_true",
                   help="never reuse cached prompt prefixes")
    p.add_argument("--shutdown-timeout", "--shutdown_timeout", dest="shutdown_timeout", type=float, default=10.0,
                   help="seconds running requests get to finish on Ctrl-C before they are cancelled")
    p.add_argument("--reasoning-format", "--reasoning_format", dest="reasoning_format", default="auto",
                   choices=["auto", "deepseek", "none"],
                   help="a thinking model's chat answers on /v1 (llama-server's flag): auto / deepseek put its "
                        "<think> thoughts in reasoning_content, none leaves them in the content; a request's "
                        "reasoning_format wins (Ollama's routes follow their think)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve the PEFT LoRA adapter folder PATH as model NAME over the same base (repeatable); "
                        "requests with different adapters share batches")
    p.add_argument("--log-level", "--log_level", dest="log_level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")
    p.set_defaults(run=run)


def parse_loras(values: list[str]) -> list[tuple[str, str]]:
    """--lora NAME=PATH values -> [(name, path)]; UsageError saying what is wrong."""
    out = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path:
            raise UsageError(f"--lora takes NAME=PATH (a model id, then a PEFT adapter folder), got {value!r}")
        if name in {n for n, _ in out}:
            raise UsageError(f"--lora names {name!r} twice; give each adapter its own name")
        out.append((name, path))
    return out


def parse_size(text: str) -> int:
    """'2GiB', '512MB', '1.5g', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].lower() not in _UNITS:
        raise UsageError(f"--kv-memory takes a size like 2GiB, 512MB or 1.5G, got {text!r}")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def size_pool(*, per_position: int, slots: int, model_context: int, budget: Optional[int],
              requested: Optional[int]) -> tuple[int, int]:
    """(positions one sequence may hold, KV blocks of BLOCK positions in the pool).

    The context is --max-seq-len if given (it must fit an explicit budget), else the model's context cut to
    what the whole pool holds; the pool is what the budget holds, but no more than every slot at full context
    can use. Without a budget (--max-seq-len given alone) every slot gets its full context, as before.

    Args:
        per_position: KV-cache bytes of one position of one sequence.
        budget: bytes for the pool; None when --max-seq-len is given without --kv-memory (no limit is set).
    """
    from llamaforge.model.kv_cache import BLOCK_SIZE as BLOCK, blocks_for

    if budget is None:
        return requested, slots * blocks_for(requested, BLOCK)
    blocks = budget // (per_position * BLOCK)
    if blocks < 1:
        raise UsageError(f"a KV-cache budget of {describe_size(budget)} holds not one block of {BLOCK} positions "
                         f"({describe_size(per_position * BLOCK)}); raise --kv-memory")
    if requested is not None and requested > blocks * BLOCK:
        need = describe_size(blocks_for(requested, BLOCK) * BLOCK * per_position)
        raise UsageError(f"--max-seq-len {requested} needs {need} of KV cache for one sequence but the budget is "
                         f"{describe_size(budget)}; raise --kv-memory or lower --max-seq-len")
    context = requested if requested is not None else min(model_context, blocks * BLOCK)
    return context, min(blocks, slots * blocks_for(context, BLOCK))


def run(args: argparse.Namespace) -> int:
    for name, value in (("--max-batch-size", args.max_batch_size), ("--max-queue", args.max_queue),
                        ("--max-num-batched-tokens", args.max_num_batched_tokens)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    budget = parse_size(args.kv_memory) if args.kv_memory is not None else None
    loras = parse_loras(args.lora)
    check_port_free(args.host, args.port)
    try:
        import uvicorn

        from llamaforge.server.app import create_app
    except ImportError as exc:
        print(f"error: serving needs FastAPI and uvicorn ({exc}); pip install 'llamaforge[serve]'", file=sys.stderr)
        return 2
    from llamaforge import devices
    from llamaforge.api import kv_bytes_per_token
    from llamaforge.model.kv_cache import BLOCK_SIZE as BLOCK

    # Without --max-seq-len the build covers the model's context (as memory allows; its rotary tables are sized
    # to it, no KV cache is allocated yet), and the slots get what the budget holds of it, below.
    llama = build_from_flags(args)
    args_ = llama.model.args
    per_position = kv_bytes_per_token(args_, llama.kv_type)
    if budget is not None:
        said = "--kv-memory"
    elif args.max_seq_len is None:
        free = devices.available_memory_bytes(llama.device)
        budget = int((free or 8 * 2**30) * KV_MEMORY_FRACTION)
        said = f"a tenth of the {describe_size(free)} free" if free else "a tenth of 8 GB (free memory unknown)"
    else:
        said = "no limit: --max-seq-len given"
    llama.max_seq_len, blocks = size_pool(per_position=per_position, slots=args.max_batch_size,
                                          model_context=llama.max_seq_len, budget=budget, requested=args.max_seq_len)
    print(f"llamaforge: KV cache {blocks} block{'s' * (blocks != 1)} of {BLOCK} positions = {describe_size(blocks * BLOCK * per_position)} "
          f"({'budget ' + describe_size(budget) + ': ' if budget else ''}{said}), shared by up to "
          f"{args.max_batch_size} sequences of up to {llama.max_seq_len} positions "
          f"(change with --kv-memory, --max-seq-len, --max-batch-size)", flush=True)
    if llama.world > 1 and llama.rank > 0:  # torchrun: rank 0 serves, the others run its model calls
        llama.follow()
        return 0
    for name, path in loras:
        try:
            llama.load_adapter(name, path)
        except LlamaforgeError as exc:
            raise UsageError(f"--lora {name}={path}: {exc}") from exc
    logging.getLogger("llamaforge").setLevel(logging.INFO)
    app = create_app(
        llama, model_name=args.served_model_name, api_key=args.api_key, n_slots=args.max_batch_size,
        max_queue=args.max_queue, max_num_batched_tokens=args.max_num_batched_tokens,
        prefix_reuse=not args.no_prefix_reuse,
        kv_memory=blocks * BLOCK * per_position, reasoning_format=args.reasoning_format,
    )
    adapters = f" with LoRA adapters {', '.join(n for n, _ in loras)}" if loras else ""
    print(f"llamaforge: serving {app.state.model_name}{adapters} on http://{args.host}:{args.port} "
          f"(chat page at /, OpenAI API at /v1)", flush=True)
    # The engine ends running requests (each stream with an error event and [DONE]) after --shutdown-timeout;
    # uvicorn's own cut of open connections comes 5 s later, only if the streams' ends could not be sent by
    # then (a margin of 0.5 s lost that race on a loaded machine and cut the connections).
    grace = max(0.0, args.shutdown_timeout)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.served.begin_shutdown(grace)  # running requests end with an error event and [DONE]
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=grace + 5.0)
    try:
        Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has shut down
        pass
    finally:
        llama.stop_followers()  # the engine is closed: let the other ranks of a torchrun launch end
    return 0
