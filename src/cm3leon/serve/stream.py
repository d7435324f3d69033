"""Watching an image being drawn: partial images while the remaining tokens are sampled.

`stream(m, run)` runs `run(on_step)`, an API call given `generate`'s per-step hook, e.g.

    for item in stream(m, lambda on_step: m.sample_images("a red circle", seed=0, on_step=on_step)):
        ...  # `Partial`s every few rows of the code grid, then the call's own result

in a worker thread. The hook draws no random numbers, so the result is the one the call
returns without it. Closing the iterator (the browser went away) stops the generation at its
next step, and the model is free again when `close()` returns.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch


@dataclass
class Partial:
    images: list  # PIL images, one per sample of the batch being drawn; rows not drawn yet are grey
    rows: int  # grid rows drawn so far in this batch
    batch: int  # batches started so far (best-of-N draws a CFG batch, then a CD-K batch)
    tokens: int  # image tokens sampled so far, all batches and samples


class Cancelled(Exception):
    """Raised inside the decode loop when nobody is listening any more."""


@dataclass
class _Finished:
    result: Any = None
    error: BaseException | None = None


GREY = (128, 128, 128)


def partial_images(m, ids: torch.Tensor, n: int) -> list:
    """Images of the first `n` sampled ids of every row of `ids` (B, >= n): the grid rows
    complete so far decoded, the rest grey."""
    h, w = m.image_tokenizer.config.grid
    codes = torch.zeros(ids.size(0), h * w, dtype=torch.long)
    codes[:, :n] = torch.from_numpy(m.vocab.ids_to_codes(ids[:, :n].cpu().numpy()))
    images = m.decode_images(codes.tolist())
    cut = round(m.resolution * (n // w) / h)
    for im in images:
        if cut < im.height:
            im.paste(GREY, (0, cut, im.width, im.height))
    return images


def stream(m, run: Callable[[Callable], Any], updates: int = 8) -> Iterator[Partial | Any]:
    """Yield a `Partial` about `updates` times per batch (at grid-row boundaries, always at a
    batch's last token), then `run`'s result; `run`'s exceptions are raised here."""
    h, w = m.image_tokenizer.config.grid
    every = max(1, h // max(1, updates)) * w
    items: queue.Queue = queue.Queue()
    stop = threading.Event()
    count = {"batch": 0, "tokens": 0}

    def on_step(n: int, out: torch.Tensor) -> None:
        if stop.is_set():
            raise Cancelled()
        if n > h * w:  # the <break> closing the image
            return
        count["batch"] += n == 1
        count["tokens"] += out.size(0)
        if n % every == 0 or n == h * w:
            items.put(Partial(partial_images(m, out, n), n // w, count["batch"], count["tokens"]))

    def work() -> None:
        try:
            items.put(_Finished(result=run(on_step)))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            items.put(_Finished(error=e))

    worker = threading.Thread(target=work, name="cm3leon-stream", daemon=True)
    worker.start()
    try:
        while True:
            item = items.get()
            if isinstance(item, _Finished):
                if item.error is not None:
                    raise item.error
                yield item.result
                return
            yield item
    finally:
        stop.set()
        worker.join()
