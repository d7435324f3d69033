"""Instruction tuning (paper Sec. 4): the task mixture, SFT data and `run_sft`. The task
templates are `cm3leon.layout.templates`."""

from cm3leon.sft.mixture import MixtureConfig, mixture_probabilities, sft_example


def run_sft(*args, **kwargs):
    """See `cm3leon.sft.cli.run_sft` (imported on first use)."""
    from cm3leon.sft.cli import run_sft as _run_sft

    return _run_sft(*args, **kwargs)


__all__ = ["MixtureConfig", "mixture_probabilities", "run_sft", "sft_example"]
