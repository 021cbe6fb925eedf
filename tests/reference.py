"""An independent restatement of Meta's `Llama.generate` (meta-llama/llama, llama/generation.py).

Used as the oracle for llamaforge's generation loop. It keeps Meta's structure (one right-padded
buffer, lock-step positions, teacher forcing, EOS handling, output cut) but recomputes the whole
prefix at every step instead of using a KV cache, so it shares no cache or position code with the
code under test.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F

from llamaforge.generation.sampler import sample_top_p


@torch.no_grad()
def meta_generate(
    model,
    prompt_tokens: List[List[int]],
    max_gen_len: int,
    max_seq_len: int,
    stop_ids,
    temperature: float = 0.6,
    top_p: float = 0.9,
    logprobs: bool = False,
    echo: bool = False,
    pad_id: int = -1,
):
    bsz = len(prompt_tokens)
    min_prompt_len = min(len(t) for t in prompt_tokens)
    max_prompt_len = max(len(t) for t in prompt_tokens)
    total_len = min(max_seq_len, max_gen_len + max_prompt_len)
    tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long)
    for k, t in enumerate(prompt_tokens):
        tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long)
    token_logprobs = torch.zeros_like(tokens, dtype=torch.float)
    stops = torch.tensor(sorted(stop_ids))
    prev_pos = 0
    eos_reached = torch.tensor([False] * bsz)
    input_text_mask = tokens != pad_id
    for cur_pos in range(min_prompt_len, total_len):
        full = model(tokens[:, :cur_pos])  # no cache: the whole prefix every step
        logits = full[:, prev_pos:cur_pos]
        if temperature > 0:
            probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
            next_token = sample_top_p(probs, top_p)
        else:
            next_token = torch.argmax(logits[:, -1], dim=-1)
        next_token = next_token.reshape(-1)
        next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
        tokens[:, cur_pos] = next_token
        if logprobs:
            token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                input=logits.transpose(1, 2), target=tokens[:, prev_pos + 1 : cur_pos + 1],
                reduction="none", ignore_index=pad_id,
            )
        eos_reached |= (~input_text_mask[:, cur_pos]) & torch.isin(next_token, stops)
        prev_pos = cur_pos
        if all(eos_reached):
            break
    out_tokens, out_logprobs = [], []
    for i, toks in enumerate(tokens.tolist()):
        start = 0 if echo else len(prompt_tokens[i])
        toks = toks[start : len(prompt_tokens[i]) + max_gen_len]
        probs: Optional[list] = token_logprobs[i].tolist()[start : len(prompt_tokens[i]) + max_gen_len]
        for stop in sorted(stop_ids):
            if stop in toks:
                idx = toks.index(stop)
                toks, probs = toks[:idx], probs[:idx]
        out_tokens.append(toks)
        out_logprobs.append(probs)
    return out_tokens, (out_logprobs if logprobs else None)
