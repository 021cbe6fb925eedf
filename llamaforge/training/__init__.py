"""Training: pretrain and fine-tune Llama models (mini-batch SGD, AdamW, LoRA), evaluate perplexity.

    from llamaforge.training import TrainConfig, train
    result = train(TrainConfig(data=["corpus.txt"], tokenizer="tok.model",
                               model_args={"dim": 128, "n_layers": 4, "n_heads": 4}, max_steps=200))
    Llama.build(result.exported)          # the trained model loads back and generates

Modules: config (TrainConfig), corpus + data (text/JSONL/chat -> memory-mapped packed windows),
optim (SGD as w - eta/len(batch) * sum grad, AdamW, warmup + cosine), lora (adapters, merge),
loop (train, checkpoints, resume), state (atomic training checkpoints), distributed (DDP/FSDP),
monitor (JSONL log, loss PNG), modeling (scratch init, fine-tune loading, export), evaluate
(sliding-window perplexity), tokenizer_train (Llama-style sentencepiece BPE).
"""

from llamaforge.training.config import LoRAConfig, TrainConfig
from llamaforge.training.eval import PerplexityResult, perplexity
from llamaforge.training.lora import LoRALinear, apply_lora, merge_lora
from llamaforge.training.loop import TrainResult, train
from llamaforge.training.optim import SGD, build_optimizer, lr_at
from llamaforge.training.state import TrainingDiverged, TrainingError
from llamaforge.training.tokenizer_train import train_tokenizer

__all__ = [
    "TrainConfig", "LoRAConfig", "train", "TrainResult", "TrainingError", "TrainingDiverged",
    "SGD", "build_optimizer", "lr_at", "LoRALinear", "apply_lora", "merge_lora",
    "perplexity", "PerplexityResult", "train_tokenizer",
]
