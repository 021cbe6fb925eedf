"""Which prompt chunks one engine step computes, and how they are grouped into forwards.

An engine step (`generation/batch.py`) runs the decode step of every decoding sequence first, then prompt
chunks in what is left of its token budget (`max_num_batched_tokens`, as vLLM's chunked prefill; llama-server's
`--batch-size`). This file decides the prompt part, in two moves:

1. `allot`: the budget goes first come first served. The oldest prompt being prefilled gets all of its
   remaining canonical chunks (positions [kC, (k+1)C)) that the budget covers before the next prompt gets any,
   as vLLM's scheduler lets a running prefill continue before a new one starts; a step always computes at
   least one chunk (a prompt never waits for the decodes to end), and the last chunk taken may pass the
   budget by less than one chunk.
2. `plan`: the allotted chunks, in that order, are cut into forwards of consecutive chunks (one forward may
   hold the chunks of several prompts, never two of one prompt: chunk k + 1 reads chunk k's keys). A
   prompt's first token is sampled and sent as soon as the forward with its last chunk is done, so one
   forward per prompt gives the earliest first tokens, but every forward also has a fixed cost (reading
   the weights, the per-layer work of the modules: about 8 rows' worth on the default model at one
   thread), and its rows are padded to its widest chunk. The plan minimises the total time requests wait
   for their next token: a prompt whose last chunk is in forward k waits until forward k ends for its first
   token, and for the whole step for its second (the next step's decode); every other request the engine
   holds (decoding sequences, prompts that go on in a later step) waits for the whole step. So splitting
   buys earlier first tokens only where it costs the rest little (on 16 short prompts together it also
   saves padding, and the step ends no later than one forward of all of them would). The
   cost of a forward is `fixed + rows`, in rows (padded: chunks x widest), with `fixed` = `FIXED_ROWS` of
   the device. Several prompts arriving together where forwards cost mostly their fixed part (a GPU) share
   one forward; with prompts many rows long each gets its own, and the first comes first.

How chunks are grouped changes speed, never results: every row of a prefill forward is computed as if
alone (`generation/runner.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

# What a prefill forward costs beyond its rows, in rows' worth, by device type. CPU: measured with
# `Runner.prefill` at one thread, CPU time, forwards of 1-16 prompts of 10 tokens: 22 ms + 2.8 ms a row on the
# default model (8 rows), 76 ms + 13 ms a row on the 1B shape (6); the fit of one line over such forwards
# moves between 6 and 10 with the sizes it is given, and timing forwards as the engine runs them gave 15-45
# (per-prompt costs besides the rows: attention, masks, first-touch KV pages), too unsteady to learn online.
# Elsewhere (a GPU: kernel launches, rows nearly free) not measured: large, so prompts share forwards.
FIXED_ROWS = {"cpu": 8.0}
FIXED_ROWS_ELSEWHERE = 512.0


def fixed_rows(device_type: str) -> float:
    """A prefill forward's fixed cost in rows on this kind of device (`FIXED_ROWS`)."""
    return FIXED_ROWS.get(device_type, FIXED_ROWS_ELSEWHERE)


@dataclass(frozen=True)
class Unit:
    """One prompt chunk of one step: positions [start, end) of `act`'s prompt; `final` if it ends the prompt."""

    act: Any  # scheduler.Active (kept opaque here: this file knows nothing of the scheduler)
    start: int
    end: int
    final: bool

    @property
    def rows(self) -> int:
        return self.end - self.start


def allot(acts: Sequence[Any], budget: int, chunk: int) -> list[Unit]:
    """The chunks of one step, oldest prompt first: `acts` are the prompts being prefilled, in the order they
    were admitted (each with `.next_pos` and `.job.prompt`); `budget` the step's prompt tokens (at least one
    chunk is taken)."""
    units: list[Unit] = []
    left = max(budget, 1)
    for act in acts:
        n, pos = len(act.job.prompt), act.next_pos
        while left > 0 and pos < n:
            end = min(n, pos + chunk)
            units.append(Unit(act, pos, end, end == n))
            left -= end - pos
            pos = end
        if left <= 0:
            break
    return units


def plan(units: Sequence[Unit], fixed_rows: float, others: int) -> list[list[Unit]]:
    """Cut `units` (in `allot`'s order) into forwards of consecutive units, each prompt at most once per forward,
    minimising the total waiting time of this step (see the module docstring).

    fixed_rows: a forward's fixed cost in rows; others: requests that wait for the whole step whatever the plan
    (besides the prompts that finish in it, which wait for it for their second token).
    """
    n = len(units)
    if n == 0:
        return []
    finals_from = [0] * (n + 1)  # final units in units[i:]
    for i in range(n - 1, -1, -1):
        finals_from[i] = finals_from[i + 1] + units[i].final
    wait_from = [finals_from[i] + finals_from[0] + others for i in range(n + 1)]
    best = [0.0] * (n + 1)  # best[i]: least waiting time of units[i:] from the start of their first forward
    cut = [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        best[i], widest = float("inf"), 0
        for j in range(i + 1, n + 1):  # forward units[i:j]
            if j - 1 > i and units[j - 1].act is units[j - 2].act:
                break  # a prompt's next chunk needs the keys of this one: never in the same forward
            widest = max(widest, units[j - 1].rows)
            # This forward delays everything still waiting at its start; on a tie the longer forward wins.
            total = (fixed_rows + (j - i) * widest) * wait_from[i] + best[j]
            if total <= best[i] + 1e-9:
                best[i], cut[i] = total, j
    forwards, i = [], 0
    while i < n:
        forwards.append(list(units[i:cut[i]]))
        i = cut[i]
    return forwards
