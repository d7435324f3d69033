"""Run every benchmark of this folder with its defaults, one after another (`make bench`);
each prints its table and writes its JSON under benchmarks/results/. Exits non-zero if any
benchmark failed, after running the rest."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = ("pretrain_tokens.py", "train_throughput.py", "decode_speed.py", "generate.py", "vq_speed.py",
           "retrieval_index.py", "faults.py", "hf_generate.py")


def main() -> int:
    failed = []
    for name in SCRIPTS:
        print(f"\n## {name}\n", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / name)], cwd=HERE.parent)
        print(f"\n({name}: exit {rc}, {time.perf_counter() - t0:.0f} s)", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
