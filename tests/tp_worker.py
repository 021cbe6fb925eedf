"""Run under torchrun by tests/test_parallel.py: greedy and sampled generation on a tensor-parallel model."""

import json
import sys

from llamaforge import Llama

ckpt, out = sys.argv[1], sys.argv[2]
gen = Llama.build(ckpt, max_seq_len=64, max_batch_size=3, device="cpu")
prompts = ["the llama model is", "hello world", "café 日本 theory of relativity states that"]
tokens = [gen.tokenizer.encode(p, bos=True) for p in prompts]
greedy, logprobs = gen.generate(tokens, 10, temperature=0, logprobs=True)
sampled, _ = gen.generate(tokens, 10, temperature=1.0, top_p=0.9)
import torch.distributed as dist

if dist.get_rank() == 0:
    with open(out, "w") as f:
        json.dump({"greedy": greedy, "logprobs": logprobs, "sampled": sampled, "world": dist.get_world_size(),
                   "local_heads": gen.model.args.n_heads}, f)
dist.barrier()  # both ranks done before either closes its gloo connections
dist.destroy_process_group()
