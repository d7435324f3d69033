"""Training hyper-parameters and their named presets (one per model preset, same name).

Paper values (CM3Leon, Yu et al. 2023, Sec. 3): Adam (0.9, 0.98), grad clip 1.0,
peak LR 6e-4 / 5e-4 / 1.2e-4 for 350M / 760M / 7B, 1500 warmup steps, 8M-token batches,
4096-token context. Not stated there and taken from OPT (Zhang et al. 2022, whose metaseq
code CM3Leon builds on): eps 1e-8, weight decay 0.1, linear decay to 10% of the peak.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from cm3leon.errors import CM3LeonError
from cm3leon.utils.dataclass_io import from_dict_strict
from cm3leon.utils.presets import lookup

PARALLEL = ("auto", "none", "ddp", "fsdp2")
DTYPES = ("bf16", "fp32", "auto")
DECAYS = ("linear", "cosine")
VAL_LOSS_ON = ("all", "query", "both")

PAPER_BATCH_TOKENS = 8 * 1024 * 1024  # "8M tokens" per optimizer step


@dataclass
class TrainConfig:
    """How to train; the model's own shape lives in `ModelConfig`."""

    steps: int = 1000  # optimizer steps
    seq_len: int = 4096  # block length (paper context: 4096)
    micro_batch_size: int = 8  # blocks per forward pass per rank
    batch_tokens: int = PAPER_BATCH_TOKENS  # tokens per optimizer step, all ranks; gradient accumulation reaches it
    lr: float = 6e-4  # peak learning rate (350M value)
    warmup_steps: int = 1500  # linear warmup from 0 (paper)
    decay: str = "linear"  # "linear" (OPT) or "cosine", from the peak to min_lr_ratio * peak at `steps`
    min_lr_ratio: float = 0.1  # final LR = 10% of the peak (OPT)
    betas: tuple[float, float] = (0.9, 0.98)  # Adam betas (paper)
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.1  # AdamW, on matrices only (OPT)
    grad_clip: float = 1.0  # max global gradient norm (paper)
    # autocast dtype: "bf16" (GPUs), "fp32", or "auto": the faster of the two, measured by a
    # short matmul probe at start (CPUs differ: bf16 is several times fp32 on some, slower on others)
    dtype: str = "bf16"
    seed: int = 0  # model init and data order
    log_every: int = 10  # steps between metrics.jsonl rows
    eval_every: int = 500  # steps between validation passes (0: only at the end)
    eval_batches: int = 20  # micro-batches per validation pass, per rank
    # Validation loss on "all" target tokens of the CM3 blocks (val_loss), on the "query"
    # pair alone, unmasked, after its retrieved documents (val_query_loss: the same tokens
    # scored at any num_retrieved, so k=2 and k=0 runs compare fairly), or "both".
    val_loss_on: str = "all"
    peak_tflops: float = 0.0  # per-device peak for MFU; 0: measured at start (a GEMM in the run's dtype)
    ckpt_every: int = 1000  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    activation_checkpointing: bool = False  # recompute blocks in backward: less memory, ~30% slower
    compile: bool = False  # torch.compile each block
    parallel: str = "auto"  # "none" | "ddp" | "fsdp2" | "auto" (fsdp2 under torchrun, else none)
    num_workers: int = 0  # DataLoader workers per rank (resume needs the same number)
    # Packed blocks keep their documents apart: each document's positions start at 0 and it
    # attends only to itself (as if trained alone; Llama 3 does the same). Always on with the
    # model's segment positions. False: a block is one sequence (positions run across documents).
    document_masking: bool = False
    # Resume even when the checkpoint was written with another training config (lr, seed,
    # batch layout, ...: see train.checkpoint.RESUME_MAY_CHANGE for what may change freely).
    override_config: bool = False

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("steps", "seq_len", "micro_batch_size", "batch_tokens", "log_every", "eval_batches",
                     "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise CM3LeonError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "num_workers"):
            if int(getattr(self, name)) < 0:
                raise CM3LeonError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.peak_tflops >= 0:
            raise CM3LeonError(f"TrainConfig.peak_tflops must be >= 0 (0: measure), got {self.peak_tflops!r}")
        if not self.lr > 0:
            raise CM3LeonError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise CM3LeonError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise CM3LeonError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        for name, allowed in (("parallel", PARALLEL), ("dtype", DTYPES), ("decay", DECAYS),
                              ("val_loss_on", VAL_LOSS_ON)):
            if getattr(self, name) not in allowed:
                raise CM3LeonError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def grad_accum_steps(self, world_size: int = 1) -> int:
        """Micro-batches per rank per step so that a step sees about `batch_tokens` tokens."""
        per_micro = self.micro_batch_size * self.seq_len * world_size
        return max(1, round(self.batch_tokens / per_micro))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return from_dict_strict(cls, d, "train config")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        """The preset called exactly `name` (see TRAIN_PRESETS), with fields overridden."""
        return cls.from_dict({**lookup(TRAIN_PRESETS, name, "train"), **overrides})

    def replace(self, **changes: Any) -> "TrainConfig":
        return replace(self, **changes)


def _paper(lr: float, tokens: float, micro_batch_size: int, **kw) -> dict[str, Any]:
    steps = int(tokens // PAPER_BATCH_TOKENS)
    return dict(steps=steps, seq_len=4096, micro_batch_size=micro_batch_size, batch_tokens=PAPER_BATCH_TOKENS,
                lr=lr, warmup_steps=1500, eval_every=1000, eval_batches=50, ckpt_every=1000, log_every=10, **kw)


# Same names as the model presets (cm3leon.model.config.PRESETS).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # tests: a few seconds on one CPU core
    "tiny": dict(steps=30, seq_len=128, micro_batch_size=4, batch_tokens=512, lr=3e-3, warmup_steps=5,
                 eval_every=10, eval_batches=2, ckpt_every=10, log_every=1, dtype="fp32"),
    # CPU demo, ~4-6 minutes on 2 cores. dtype auto: bf16 matmuls are several times fp32 on
    # some CPUs and far slower on others, so the run measures which. Rough fp32 speeds, 2 busy
    # cores, 512-token blocks: demo ~1.5k tokens/s, demo-small ~2.9k; an idle machine is 2-3x faster.
    "demo-small": dict(steps=400, seq_len=512, micro_batch_size=8, batch_tokens=4096, lr=2e-3, warmup_steps=40,
                       eval_every=100, eval_batches=8, ckpt_every=100, log_every=10, dtype="auto"),
    "demo": dict(steps=250, seq_len=512, micro_batch_size=8, batch_tokens=4096, lr=1.5e-3, warmup_steps=25,
                 eval_every=50, eval_batches=8, ckpt_every=50, log_every=10, dtype="auto"),
    # paper sizes (Sec. 3): 1.4T / 1.9T / 2.4T tokens in 8M-token steps
    "350m": _paper(6e-4, 1.4e12, micro_batch_size=8),
    "760m": _paper(5e-4, 1.9e12, micro_batch_size=4),
    "7b": _paper(1.2e-4, 2.4e12, micro_batch_size=1, activation_checkpointing=True),
}
