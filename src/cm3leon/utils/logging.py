"""Progress and metrics for long-running commands: a tqdm bar for people (rate, ETA) and a
JSONL file for programs, one line per logged step."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def progress(total: int | None = None, desc: str = "", unit: str = "it", **kw) -> tqdm:
    """A progress bar with rate and ETA; quiet when stderr is not a terminal except for
    sparse updates, so CI logs stay readable."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        mininterval=0.5 if interactive else 30.0,
        file=sys.stderr,
        **kw,
    )


class MetricsLogger:
    """Append-only JSONL metrics: `log(step=..., loss=...)` writes one line with a timestamp.

    Appending keeps the history of a resumed run; each line is flushed so a crash loses at
    most the line being written."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._f = None
        self._t0 = time.time()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")

    def log(self, **fields: Any) -> None:
        if self._f is None:
            return
        row = {"time": round(time.time(), 3), "elapsed_s": round(time.time() - self._t0, 3)}
        row.update({k: (v.item() if hasattr(v, "item") else v) for k, v in fields.items()})
        try:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()
        except OSError as e:
            from cm3leon.utils.io import raise_if_out_of_space

            f, self._f = self._f, None
            try:  # the unwritten row stays behind in the buffer: closing would fail the same way
                f.close()
            except OSError:
                pass
            raise_if_out_of_space(e, self.path)
            raise

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def trim_metrics(path: str | Path, step: int) -> None:
    """Drop the rows of a metrics JSONL file logged after `step` (a resumed run trains those
    steps again; rows without a step are kept). Rewritten atomically; absent file: nothing."""
    from cm3leon.utils.io import write_jsonl

    path = Path(path)
    if path.exists():
        write_jsonl(path, [r for r in read_metrics(path) if not isinstance(r.get("step"), (int, float))
                           or r["step"] <= step])


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a metrics JSONL file (a torn last line from a crash is ignored)."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
