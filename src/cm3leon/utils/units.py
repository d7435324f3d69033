"""Whole dataset units (a webdataset's .tar shards; a folder or COCO set is one unit) shared
out to `--workers N` processes or to the ranks of `torchrun`: what `cm3leon tokenize` and
`cm3leon index build` have in common. Each unit's output depends on the unit alone, so the
result does not depend on how many processes made it."""

from __future__ import annotations

import os
from typing import Callable

from cm3leon.errors import CM3LeonError


def torchrun() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) of torchrun; (0, 1) without it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def barrier_group(world: int) -> bool:
    """Under torchrun, a gloo process group for barriers (a rank must not clean up another's
    temporaries mid-write), unless one is set up already. True when this call made it: the
    caller then destroys it (`torch.distributed.destroy_process_group()`) when done."""
    import torch.distributed as dist

    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        return True
    return False


def check_job(path, state: dict, what: str) -> None:
    """A resumable job's settings file (`path`, written by the run that started it) must hold
    `state`: a re-run with other settings would mix two jobs' parts. Checked by every rank,
    before any of them writes."""
    from cm3leon.utils.io import read_json

    if os.path.isfile(path):
        prev = read_json(path)
        if prev != state:
            raise CM3LeonError(f"{path}: an interrupted {what} with other settings ({prev}); "
                               f"delete {os.path.dirname(path)} to start over")


def check_workers(workers: int, world: int) -> None:
    """--workers must be >= 1, and 1 under torchrun (each rank is one worker)."""
    if workers < 1:
        raise CM3LeonError(f"--workers must be >= 1, got {workers}")
    if world > 1 and workers > 1:
        raise CM3LeonError(f"--workers {workers} under torchrun: each of the {world} ranks is one worker; "
                           "pass --workers 1 or run without torchrun")


def worker_init(threads: int, parent: int) -> None:
    """A worker process: `threads` torch threads, and it dies with the process that started
    it, so a `kill -9` of the command leaves no worker writing beside the next run."""
    import torch

    torch.set_num_threads(threads)
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass  # not Linux: the pool's own shutdown ends the workers
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def run_units(fn: Callable, units: list[int], workers: int, bar, count: str, threads: int | None = None) -> None:
    """Run `fn(unit, bar)` for each unit in this process (one worker or one unit), else
    `fn(unit)` in a pool of `workers` spawned processes, advancing `bar` by each returned
    info's `count` field. `fn` must be picklable (a module-level function or a partial of one).
    Each worker gets `threads` torch threads (default: this process's threads shared out)."""
    if workers == 1 or len(units) <= 1:
        for u in units:
            fn(u, bar)
        return
    import multiprocessing

    import torch

    threads = threads or max(1, torch.get_num_threads() // workers)
    ctx = multiprocessing.get_context("spawn")  # no forked torch state
    with ctx.Pool(min(workers, len(units)), initializer=worker_init, initargs=(threads, os.getpid())) as pool:
        for info in pool.imap_unordered(fn, units):
            bar.update(info[count])
