"""Preference tuning: DPO (Rafailov et al. 2023) and reference-free SimPO (Meng et al. 2024) from JSONL pairs.

Each line is `{"prompt": str, "chosen": str, "rejected": str}` (plain text: the prompt with BOS, each
answer followed by EOS) or `{"messages": [...], "chosen": ..., "rejected": ...}` (a dialog ending in a
user turn, answered in the model's chat format: `chosen` / `rejected` are the assistant's content, a
string or an assistant message). Only the answer's tokens count: the prompt and the chat format's
markup before the answer are masked, exactly as in chat fine-tuning (corpus.encode_chat_example).

For a policy pi, a pair (x, y_w, y_l) and log pi(y | x) summed over the answer's tokens:

    DPO:   loss = -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))))
    SimPO: loss = -log sigmoid(beta * (log pi(y_w) / |y_w| - log pi(y_l) / |y_l|) - gamma)

The reference model of DPO is the model the run starts from: its log-probabilities of every pair are
computed once, before the first step (and again, identically, when a run resumes), so neither a second
copy of the weights nor a second forward pass per step is needed, with LoRA or full weights alike.

A step's loss is the mean over the pairs of the global mini-batch (loop.py's scaling with pairs in
place of tokens). Evaluation reports the mean loss, `reward_accuracy` (pairs whose loss margin above is
> 0) and `preference_accuracy` (pairs whose chosen answer has the higher mean log-probability per
token under the policy: a measure that means the same before and after training).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from llamaforge.errors import ConfigError
from llamaforge.training.data import IGNORE_INDEX

LOSSES = ("dpo", "simpo")
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0}


@dataclass
class Pair:
    """Token ids of one preference pair: the prompt, then each answer (only the answers are scored)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _answer(value: Any, where: str, key: str) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, Mapping):
        if value.get("role") != "assistant":
            raise ConfigError(f"{where}: '{key}' as a message must have role 'assistant', got {value.get('role')!r}")
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: '{key}' must be a non-empty string (or one assistant message)")
    return value


def _split_chat(chat_format: Any, messages: list, answer: str, where: str) -> tuple[list[int], list[int]]:
    from llamaforge.training.corpus import encode_chat_example

    ids, mask = encode_chat_example(chat_format, messages + [{"role": "assistant", "content": answer}])
    end = len(mask) - mask[::-1].index(1) if 1 in mask else 0
    start = end
    while start > 0 and mask[start - 1] == 1:
        start -= 1
    if start == end:
        raise ConfigError(f"{where}: the chat format left no answer tokens to score")
    return ids[:start], ids[start:end]


def encode_pair(record: Any, tokenizer: Any, chat_format: Any, where: str) -> Pair:
    """One JSONL record as a Pair (see the module docstring)."""
    from llamaforge.training.corpus import _check_chat

    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise ConfigError(f"{where}: a preference line needs 'chosen' and 'rejected' beside 'prompt' or 'messages'")
    chosen, rejected = _answer(record["chosen"], where, "chosen"), _answer(record["rejected"], where, "rejected")
    if "messages" in record:
        if chat_format is None:
            raise ConfigError(f"{where}: 'messages' need a tokenizer with a chat format; give a plain 'prompt'")
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "user":
            raise ConfigError(f"{where}: 'messages' must be a dialog ending in a user message")
        _check_chat(messages + [{"role": "assistant", "content": chosen}], where)
        prompt, c = _split_chat(chat_format, list(messages), chosen, where)
        prompt_r, r = _split_chat(chat_format, list(messages), rejected, where)
        if prompt_r != prompt:
            raise ConfigError(f"{where}: the chat format renders the prompt differently for the two answers")
        return Pair(prompt, c, r)
    if not isinstance(record.get("prompt"), str):
        raise ConfigError(f"{where}: 'prompt' must be a string (or give 'messages' for a chat)")
    bos = tokenizer.add_bos and tokenizer.bos_id is not None
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return Pair(tokenizer.encode(record["prompt"], bos=bos), tokenizer.encode(chosen) + eos,
                tokenizer.encode(rejected) + eos)


def _fit(pair: Pair, seq_len: int) -> Pair:
    """Cut a pair to seq_len tokens per sequence: the prompt from the left (to no less than half), then the answers."""
    longest = max(len(pair.chosen), len(pair.rejected))
    keep = max(seq_len - longest, min(len(pair.prompt), seq_len // 2))
    prompt = pair.prompt[-keep:] if keep else []
    room = seq_len - len(prompt)
    return Pair(prompt, pair.chosen[:room], pair.rejected[:room])


class PairSet:
    """Preference pairs, batched as 2B right-padded sequences: the chosen answers, then the rejected ones."""

    def __init__(self, pairs: Sequence[Pair], name: str):
        self.pairs = list(pairs)
        self.name = name

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x (2B, L-1) and next-token targets y (2B, L-1), IGNORE_INDEX outside the answers."""
        rows = [(self.pairs[int(i)].prompt, self.pairs[int(i)].chosen) for i in indices]
        rows += [(self.pairs[int(i)].prompt, self.pairs[int(i)].rejected) for i in indices]
        length = max(len(p) + len(a) for p, a in rows)
        x = torch.zeros(len(rows), length - 1, dtype=torch.long)
        y = torch.full((len(rows), length - 1), IGNORE_INDEX, dtype=torch.long)
        for row, (prompt, answer) in enumerate(rows):
            seq = torch.tensor(prompt + answer, dtype=torch.long)
            n = len(seq) - 1
            x[row, :n] = seq[:-1]
            start = max(len(prompt) - 1, 0)  # position whose next token is the answer's first
            y[row, start:n] = seq[start + 1:]
        return x, y

    def n_tokens(self, indices: Sequence[int]) -> int:
        p = self.pairs
        return sum(2 * len(p[int(i)].prompt) + len(p[int(i)].chosen) + len(p[int(i)].rejected) for i in indices)


def load_pairs(sources: Sequence[str], tokenizer: Any, chat_format: Any, seq_len: int, *, val_fraction: float,
               seed: int, val_sources: Optional[Sequence[str]] = None) -> tuple[PairSet, Optional[PairSet], str]:
    """Training and validation pairs from JSONL files, and a fingerprint of their tokens (for resuming)."""

    def read(paths: Sequence[str]) -> list[Pair]:
        pairs = []
        for path in paths:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"preference data {p} does not exist (give JSONL files of prompt/chosen/rejected)")
            with open(p, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{p}:{lineno}"
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"{where}: not valid JSON ({exc})") from None
                    pairs.append(_fit(encode_pair(record, tokenizer, chat_format, where), seq_len))
        return pairs

    pairs = read(sources)
    if val_sources:
        val = read(val_sources)
    else:
        order = list(range(len(pairs)))
        random.Random(seed).shuffle(order)
        n_val = int(round(len(pairs) * val_fraction))
        val = [pairs[i] for i in order[:n_val]]
        pairs = [pairs[i] for i in sorted(order[n_val:])]
    if not pairs:
        raise ConfigError(f"no preference pairs for training in {list(sources)}")
    digest = hashlib.sha256()
    for p in pairs + val:
        digest.update(np.asarray(p.prompt + [-1] + p.chosen + [-1] + p.rejected + [-2], dtype=np.int64).tobytes())
    return PairSet(pairs, "training"), (PairSet(val, "validation") if val else None), digest.hexdigest()


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(target) over each row's counted targets (float32), and their number: logits (R, T, V)."""
    token = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view(targets.shape)  # (R, T)
    counted = targets != IGNORE_INDEX
    return token.sum(1), counted.sum(1)


def pair_losses(loss: str, beta: float, gamma: float, logp: torch.Tensor, n: torch.Tensor,
                ref: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair loss and margin (> 0: the loss prefers the chosen answer); logp, n, ref are (2B,): chosen, rejected."""
    b = logp.shape[0] // 2
    if loss == "dpo":
        ratio = logp - ref.to(logp)  # log pi / ref, (2B,)
        margin = beta * (ratio[:b] - ratio[b:])
    else:
        mean = logp / n.clamp(min=1)
        margin = beta * (mean[:b] - mean[b:]) - gamma
    return -F.logsigmoid(margin), margin


class PreferenceObjective:
    """The preference loss of a run: its pairs, the reference log-probabilities, loss and evaluation."""

    def __init__(self, loss: str, beta: float, gamma: float, train: PairSet, val: Optional[PairSet]):
        self.loss, self.beta, self.gamma = loss, beta, gamma
        self.train, self.val = train, val
        self.ref: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _all_logps(self, model: torch.nn.Module, pairs: PairSet, batch_size: int, device: torch.device,
                   autocast: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p and answer lengths of every pair, (N, 2): chosen, rejected."""
        logps, counts = [], []
        for i in range(0, len(pairs), batch_size):
            idx = list(range(i, min(i + batch_size, len(pairs))))
            x, y = pairs.batch(idx)
            with autocast():
                logits = model(x.to(device))
            lp, n = sequence_logps(logits, y.to(device))
            logps.append(lp.view(2, -1).t().double().cpu())
            counts.append(n.view(2, -1).t().cpu())
        return torch.cat(logps), torch.cat(counts)

    def prepare(self, model: torch.nn.Module, batch_size: int, device: torch.device, autocast: Callable[[], Any]) -> None:
        """DPO: the starting model's log-probabilities of every pair (the reference); SimPO needs none."""
        if self.loss != "dpo":
            return
        was_training = model.training
        model.eval()
        for name, pairs in (("training", self.train), ("validation", self.val)):
            if pairs is not None:
                self.ref[name] = self._all_logps(model, pairs, batch_size, device, autocast)[0]
        model.train(was_training)

    def _ref_for(self, name: str, indices: Sequence[int]) -> Optional[torch.Tensor]:
        if self.loss != "dpo":
            return None
        ref = self.ref[name][torch.as_tensor(list(indices), dtype=torch.long)]  # (B, 2)
        return ref.t().reshape(-1)  # (2B,): chosen, then rejected

    def loss_sum(self, model: torch.nn.Module, indices: Sequence[int], device: torch.device,
                 autocast: Callable[[], Any]) -> torch.Tensor:
        """Sum of the pair losses of `indices` (differentiable)."""
        x, y = self.train.batch(indices)
        with autocast():
            logits = model(x.to(device))  # (2B, T, V)
        logp, n = sequence_logps(logits, y.to(device))
        ref = self._ref_for("training", indices)
        losses, _ = pair_losses(self.loss, self.beta, self.gamma, logp, n, None if ref is None else ref.to(device))
        return losses.sum()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batch_size: int, device: torch.device,
                 autocast: Callable[[], Any]) -> Optional[dict[str, float]]:
        """Mean loss, reward_accuracy and preference_accuracy over the validation pairs."""
        if self.val is None:
            return None
        logps, counts = self._all_logps(model, self.val, batch_size, device, autocast)  # (N, 2) each
        ref = self.ref.get("validation")
        flat = logps.t().reshape(-1)
        losses, margins = pair_losses(self.loss, self.beta, self.gamma, flat, counts.t().reshape(-1),
                                      None if ref is None else ref.t().reshape(-1))
        per_token = logps / counts.clamp(min=1)
        return {
            "loss": float(losses.mean()),
            "reward_accuracy": float((margins > 0).double().mean()),
            "preference_accuracy": float((per_token[:, 0] > per_token[:, 1]).double().mean()),
        }
