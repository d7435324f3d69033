"""One exception type for bad input: the CLI prints its message (no stack trace) and exits 2.

Subclasses ValueError so library callers can catch it as the usual kind of bad-argument
error. The message names the file / field / argument and what is wrong with it."""


class CM3LeonError(ValueError):
    pass


class DiskFullError(CM3LeonError):
    """A write failed for lack of space (disk full, quota, file size limit); nothing was replaced.
    `reason` says which."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency or fail with a message naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{purpose} needs the '{module}' package: pip install 'cm3leon[{extra}]' ({e})"
        ) from None
