"""Instruction tuning (paper Sec. 4): task templates, the task mixture, SFT data and `run_sft`."""

from cm3leon.sft.mixture import MixtureConfig, mixture_probabilities, sft_example
from cm3leon.sft.templates import TEMPLATES, TemplateDoc, prompt, render


def run_sft(*args, **kwargs):
    """See `cm3leon.sft.cli.run_sft` (imported on first use)."""
    from cm3leon.sft.cli import run_sft as _run_sft

    return _run_sft(*args, **kwargs)


__all__ = ["TEMPLATES", "MixtureConfig", "TemplateDoc", "mixture_probabilities", "prompt", "render", "run_sft",
           "sft_example"]
