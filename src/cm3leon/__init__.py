"""cm3leon: CM3Leon (Yu et al. 2023, "Scaling Autoregressive Multi-Modal Models:
Pretraining and Instruction Tuning", arXiv:2309.02591) from data to report."""

__version__ = "0.1.0"

__all__ = ["CM3Leon", "__version__"]


def __getattr__(name):
    # Lazy: `import cm3leon` stays cheap (the CLI imports it for every subcommand).
    if name == "CM3Leon":
        from cm3leon.api import CM3Leon

        return CM3Leon
    raise AttributeError(f"module 'cm3leon' has no attribute {name!r}")
