"""TrainConfig: every setting of a training run, from a TOML file, flags or Python.

A TOML file holds the flat settings at the top level, the shape of a model trained from scratch in
a `[model_args]` table (ModelArgs fields; `vocab_size` defaults to the tokenizer's), and LoRA in a
`[lora]` table (and DPO / SimPO in a `[preference]` table, see TrainConfig):

    data = ["corpus.txt"]          # text / JSONL files or folders
    tokenizer = "tok.model"        # from scratch; a fine-tuned checkpoint brings its own
    out_dir = "runs/tiny"
    optimizer = "adamw"            # or "sgd"
    lr = 1e-3
    max_steps = 300
    [model_args]
    dim = 128
    n_layers = 4
    n_heads = 4
    max_seq_len = 256

Unknown keys are errors that list the known ones. Every setting is checked against one rule
(`TRAIN_RULES`, `LORA_RULES`: type and range) when the config is made, before any data is read.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from llamaforge.errors import ConfigError
from llamaforge.training.lora import LORA_TARGETS
from llamaforge.training.optim import OPTIMIZERS


@dataclass
class LoRAConfig:
    """LoRA adapters: rank r, scale alpha / r, dropout, and the projections that get one."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wv"])

    def __post_init__(self) -> None:
        check_fields(self, LORA_RULES, "lora.")
        bad = sorted(set(self.targets) - set(LORA_TARGETS))
        if bad or not self.targets:
            raise ConfigError(f"lora.targets {self.targets} has unknown names {bad}; choose from {list(LORA_TARGETS)}")


@dataclass
class PreferenceConfig:
    """Preference tuning (training/preference.py): `loss` "dpo" or "simpo" (reference-free), `beta`
    (None: 0.1 for DPO, 2.0 for SimPO), SimPO's target margin `gamma`."""

    loss: str = "dpo"
    beta: Optional[float] = None
    gamma: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in ("dpo", "simpo"):
            raise ConfigError(f"preference.loss must be 'dpo' or 'simpo', got {self.loss!r}")
        if self.beta is None:
            self.beta = {"dpo": 0.1, "simpo": 2.0}[self.loss]
        if not isinstance(self.beta, (int, float)) or not self.beta > 0:
            raise ConfigError(f"preference.beta must be a number > 0, got {self.beta!r}")


@dataclass
class TrainConfig:
    """A training run. See the module docstring for the TOML layout.

    Model: `model` is a checkpoint to fine-tune (Meta/HF folder or .gguf; "default" is the default
    model); without it, a model of shape `model_args` is trained from scratch with `tokenizer`.
    Data: `data` files/folders, cut into windows of `seq_len` tokens; `val_fraction` goes to validation
    (or `val_data` files are the validation set).
    Optimization: `optimizer` ("sgd": w - lr * mean gradient, or "adamw"), `lr` with `warmup_steps`
    linear warmup then cosine decay to `min_lr` (default lr/10) at `max_steps`; `grad_clip` (0: off);
    a step uses `batch_size * grad_accum * world_size` windows.
    Precision/memory: `autocast` "bf16" runs matmuls in bfloat16 (weights stay float32; "fp16" is
    refused: it needs loss scaling);
    `activation_checkpointing` recomputes each block in the backward pass (None: on exactly when the
    base is quantized); `fsdp` shards the model across processes under torchrun (DDP otherwise).
    QLoRA: `quantize` "gguf" keeps a GGUF file's quantized weights in their blocks, "q4_0" / "q8_0" /
    "q4_1" / "q5_0" / "q5_1" quantizes a float checkpoint's linear layers on load; the base is frozen
    and needs a `[lora]` table.
    Preference tuning: a `[preference]` table (loss "dpo" / "simpo", beta, gamma) trains on JSONL pairs
    `{"prompt" | "messages", "chosen", "rejected"}` in `data` (see training/preference.py), with LoRA or
    full weights; `batch_size` counts pairs, `seq_len` bounds each prompt + answer.
    Output in `out_dir`: checkpoint.pt (resumable state), log.jsonl, loss.png, and the exported model
    (`export`: "auto", "meta", "hf", "gguf" or "none") in `out_dir/model`.
    """

    data: list[str] = field(default_factory=list)
    out_dir: str = "runs/train"
    model: Optional[str] = None
    tokenizer: Optional[str] = None
    model_args: Optional[dict[str, Any]] = None
    init_std: float = 0.02
    # data
    seq_len: int = 256
    val_fraction: float = 0.05
    val_data: Optional[list[str]] = None
    data_dir: Optional[str] = None
    # optimization
    optimizer: str = "adamw"
    lr: float = 3e-4
    min_lr: Optional[float] = None
    warmup_steps: int = 0
    schedule: str = "cosine"
    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    # precision, memory, devices
    device: str = "auto"
    autocast: str = "none"
    activation_checkpointing: Optional[bool] = None
    fsdp: bool = False
    lora: Optional[LoRAConfig] = None
    # QLoRA: keep the base quantized ("gguf": a GGUF file's blocks; "q4_0", "q8_0", ...: quantized on load)
    quantize: Optional[str] = None
    # preference tuning (DPO / SimPO) on JSONL pairs instead of next-token training
    preference: Optional[PreferenceConfig] = None
    # progress, evaluation, checkpoints
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 50
    log_every: int = 1
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 48
    sample_temperature: float = 0.8
    resume: bool = True
    export: str = "auto"
    export_dtype: Optional[str] = None
    seed: int = 1337
    progress: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        if isinstance(self.val_data, (str, Path)):
            self.val_data = [str(self.val_data)]
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig(**_known(LoRAConfig, self.lora, "[lora]"))
        elif self.lora is True:
            self.lora = LoRAConfig()
        elif self.lora is False:
            self.lora = None
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)  # type: ignore[assignment]
        if isinstance(self.preference, dict):
            self.preference = PreferenceConfig(**_known(PreferenceConfig, self.preference, "[preference]"))
        check_fields(self, TRAIN_RULES)
        if self.model_args is not None:  # the shape is checked now, not after the data is prepared
            from llamaforge.model.args import ModelArgs

            _known(ModelArgs, self.model_args, "[model_args]")
            required = [f.name for f in dataclasses.fields(ModelArgs)
                        if f.default is dataclasses.MISSING and f.name != "vocab_size"]
            missing = [k for k in required if k not in self.model_args]
            if missing:
                raise ConfigError(f"[model_args] lacks {missing}; a model trained from scratch needs {required}")
            ModelArgs(**{"vocab_size": 1, **self.model_args})
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"min_lr ({self.min_lr}) must not be larger than lr ({self.lr})")
        if self.warmup_steps > self.max_steps:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) must not exceed max_steps ({self.max_steps})")
        if not self.data:
            raise ConfigError("no training data: set `data` to text/JSONL files or folders")
        if self.model is None and self.model_args is None:
            raise ConfigError("set `model` (a checkpoint to fine-tune) or `[model_args]` (a shape to train from scratch)")
        if self.model is not None and self.model_args is not None:
            raise ConfigError("set either `model` (fine-tune) or `[model_args]` (from scratch), not both")
        if self.quantize is not None:
            from llamaforge.kernels import QUANTIZABLE

            schemes = ["gguf"] + [q.lower() for q in QUANTIZABLE]
            if self.quantize not in schemes:
                raise ConfigError(f"quantize must be one of {schemes} (or left out), got {self.quantize!r}")
            if self.lora is None or self.model is None:
                raise ConfigError("quantize keeps a fine-tuned model's base frozen and quantized, so it needs `model` "
                                  "and a [lora] table (the adapters are what trains)")
            if self.fsdp:
                raise ConfigError("quantize (QLoRA) does not combine with fsdp; use DDP (fsdp = false)")
        if self.model is None and self.tokenizer is None:
            raise ConfigError("training from scratch needs `tokenizer` (make one with `llamaforge tokenizer train`)")

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir)

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (lists, dicts, numbers, strings), as stored in checkpoints."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return cls(**_known(cls, values, "the training config"))

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Optional[dict[str, Any]] = None) -> "TrainConfig":
        """Read a TOML config; `overrides` (e.g. from command-line flags) win over the file.

        Relative paths in `data`, `tokenizer`, `model` and `out_dir` are taken relative to the
        current directory, as on a command line.
        """
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            try:
                import tomli as tomllib
            except ImportError as exc:
                raise ConfigError("reading TOML on Python 3.10 needs `pip install tomli`") from exc
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"training config {p} does not exist")
        try:
            values = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p} is not valid TOML: {exc}") from None
        values.update(overrides or {})
        return cls.from_dict(values)


# -- validation: one rule per setting -------------------------------------------------------------------
#
# Each setting has one rule: a type and range check that returns None when the value is good, or what it
# must be. The whole config is checked when it is made (before any data is read or step 0 runs), and a new
# setting is one line here.

Rule = Callable[[Any], Optional[str]]


def _int(low: int = 0, high: int = 2**63 - 1) -> Rule:
    def rule(v: Any) -> Optional[str]:
        ok = isinstance(v, int) and not isinstance(v, bool) and low <= v <= high
        return None if ok else f"an integer in [{low}, {high}]"
    return rule


def _float(low: float = 0.0, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Rule:
    def rule(v: Any) -> Optional[str]:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
            and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        return None if ok else f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return rule


def _choice(*options: Any) -> Rule:
    return lambda v: None if isinstance(v, (str, type(None))) and v in options else f"one of {list(options)}"


def _is(*types: type) -> Rule:
    names = " or ".join("None" if t is type(None) else t.__name__ for t in types)
    return lambda v: None if isinstance(v, types) and not (isinstance(v, bool) and bool not in types) else names


def _strings(allow_none: bool = False) -> Rule:
    def rule(v: Any) -> Optional[str]:
        ok = (v is None and allow_none) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
        return None if ok else "a list of strings" + (" or None" if allow_none else "")
    return rule


def _optional(inner: Rule) -> Rule:
    return lambda v: None if v is None else (None if inner(v) is None else f"{inner(v)} or None")


def _betas(v: Any) -> Optional[str]:
    ok = isinstance(v, tuple) and len(v) == 2 and all(_float(0, 1, high_open=True)(b) is None for b in v)
    return None if ok else "two numbers in [0, 1), e.g. [0.9, 0.95]"


EXPORT_FORMATS = ("auto", "meta", "hf", "gguf", "none")
# Meta/HF exports cast to a torch dtype; GGUF exports write one of save_gguf's types.
EXPORT_DTYPES = ("float32", "fp32", "f32", "float16", "fp16", "f16", "half", "bfloat16", "bf16", "q8_0")

TRAIN_RULES: dict[str, Rule] = {
    "data": _strings(),
    "out_dir": _is(str),
    "model": _is(str, type(None)),
    "tokenizer": _is(str, type(None)),
    "model_args": _is(dict, type(None)),
    "init_std": _float(0, 1, low_open=True),
    "seq_len": _int(1, 1 << 24),
    "val_fraction": _float(0, 1, high_open=True),
    "val_data": _strings(allow_none=True),
    "data_dir": _is(str, type(None)),
    "optimizer": _choice(*OPTIMIZERS),
    "lr": _float(0, 10, low_open=True),
    "min_lr": _optional(_float(0, 10)),
    "warmup_steps": _int(0),
    "schedule": _choice("cosine", "constant"),
    "max_steps": _int(1),
    "batch_size": _int(1, 1 << 20),
    "grad_accum": _int(1, 1 << 20),
    "grad_clip": _float(0),
    "weight_decay": _float(0, 1),
    "momentum": _float(0, 1, high_open=True),
    "betas": _betas,
    "device": _is(str),
    # fp16 autocast needs loss scaling (a GradScaler) to train safely; it is refused rather than ignored
    "autocast": _choice("none", "bf16"),
    "activation_checkpointing": _is(bool, type(None)),  # None: on exactly when the base is quantized
    "fsdp": _is(bool),
    "lora": _is(LoRAConfig, type(None)),
    "quantize": _is(str, type(None)),  # its values are checked with the kernels' list, after the types
    "preference": _is(PreferenceConfig, type(None)),
    "eval_every": _int(0),
    "eval_batches": _int(1),
    "save_every": _int(0),
    "log_every": _int(0),
    "sample_every": _int(0),
    "sample_prompts": _strings(),
    "sample_tokens": _int(1, 1 << 20),
    "sample_temperature": _float(0, 100),
    "resume": _is(bool),
    "export": _choice(*EXPORT_FORMATS),
    "export_dtype": _choice(None, *EXPORT_DTYPES),
    "seed": _int(0, 2**63 - 1),
    "progress": _is(bool),
    "plot": _is(bool),
}

LORA_RULES: dict[str, Rule] = {
    "rank": _int(1, 1 << 16),
    "alpha": _float(0, 1e6, low_open=True),
    "dropout": _float(0, 1, high_open=True),
    "targets": _strings(),
}


def check_fields(obj: Any, rules: dict[str, Rule], prefix: str = "") -> None:
    """Check every field of a config dataclass against its rule (the tests require one per field).

    Raises:
        ConfigError: naming the first setting that is wrong, what it must be and what it is.
    """
    for f in dataclasses.fields(obj):
        if f.name not in rules:
            continue
        value = getattr(obj, f.name)
        must = rules[f.name](value)
        if must is not None:
            if f.name == "autocast" and value == "fp16":
                must += " ('fp16' needs loss scaling, which llamaforge does not do: use 'bf16')"
            raise ConfigError(f"{prefix}{f.name} must be {must}, got {value!r:.80}")


def _known(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown} in {where}; known settings are {sorted(names)}")
    return dict(values)
