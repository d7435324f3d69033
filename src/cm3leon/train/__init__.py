"""Training: the generic loop (pretraining and instruction tuning), parallelism, checkpoints."""

from cm3leon.train.config import TRAIN_PRESETS, TrainConfig
from cm3leon.train.schedule import lr_at


def train(*args, **kwargs):
    """See `cm3leon.train.loop.train` (imported on first use)."""
    from cm3leon.train.loop import train as _train

    return _train(*args, **kwargs)


def pretrain(*args, **kwargs):
    """See `cm3leon.train.cli.pretrain` (imported on first use)."""
    from cm3leon.train.cli import pretrain as _pretrain

    return _pretrain(*args, **kwargs)


__all__ = ["TRAIN_PRESETS", "TrainConfig", "lr_at", "train", "pretrain"]
