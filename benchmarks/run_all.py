"""`make bench`: the two side-by-side comparisons with transformers (text->image decoding with
CFG, `generate.py`; a training step, `train_throughput.py`), each in one process so that ours
and the reference share the machine's load, then one markdown table of both
(benchmarks/results/speed.md: ours, transformers, ratio, matmul floor, bound). About 3 minutes on 2 CPU
cores. `--all` also runs every other benchmark of this folder with its defaults. Exits
non-zero if any benchmark failed, after running the rest."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
COMPARISONS = (("generate.py", ["--threads", "1"]),
               ("train_throughput.py", ["--presets", "", "--steps", "4", "--threads", "1", "--dtypes", "auto"]))
OTHERS = ("pretrain_tokens.py", "decode_speed.py", "vq_speed.py", "retrieval_index.py", "faults.py",
          "hf_generate.py")


def speed_table(gen: dict, train: dict) -> str:
    """One markdown table from generate.json and train_throughput.json."""
    lines = ["| benchmark | case | ours | ours | transformers | ours / transformers | matmul floor (its ratio) | bound |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in gen.get("results", []):
        case = f"{r['preset']}, {r['tokens_per_image']}-token images x {r['batch']}, CFG, {gen['dtype']}"
        for name, v in r["variants"].items():
            extra = f" (compile {r['compile_s']:.0f} s apart)" if name == "ours, compiled" and r.get("compile_s") else ""
            floor = (f"{r['matmul_floor_tokens_per_s']:.0f} ({r['matmul_floor_over_hf']:.2f}x)"
                     if r.get("matmul_floor_tokens_per_s") else "-")
            lines.append(f"| decoding (tok/s) | {case} | {name}{extra} | {v['tokens_per_s']:.0f} | "
                         f"{r['hf_tokens_per_s']:.0f} | {v['speedup']:.2f}x | {floor} | {r['bound_tokens_per_s']:.0f} |")
    rows = train.get("ours_vs_hf", [])
    for ours, hf in zip(rows[::2], rows[1::2]):
        case = f"{ours['preset']}, {ours['step']}, {ours['dtype']}, {ours['batch']}x{ours['seq_len']}"
        bound = ours["tokens_per_s"] / ours["mfu"] if ours.get("mfu") else float("nan")
        lines.append(f"| training step (tok/s) | {case} | trainer | {ours['tokens_per_s']:.0f} | "
                     f"{hf['tokens_per_s']:.0f} | {ours['ours_over_hf']:.2f}x | - | {bound:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="also run the other benchmarks of this folder")
    args = ap.parse_args(argv)
    failed = []
    runs = list(COMPARISONS) + ([(name, []) for name in OTHERS] if args.all else [])
    for name, extra in runs:
        print(f"\n## {name}\n", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / name), *extra], cwd=HERE.parent)
        print(f"\n({name}: exit {rc}, {time.perf_counter() - t0:.0f} s)", flush=True)
        if rc:
            failed.append(name)
    if not {"generate.py", "train_throughput.py"} & set(failed):
        gen = json.loads((RESULTS / "generate.json").read_text())
        train = json.loads((RESULTS / "train_throughput.json").read_text())
        table = speed_table(gen, train)
        note = (f"Ours vs transformers {gen['transformers']} (`OPTForCausalLM`, the same weights), side by side in "
                f"one process each; torch {gen['torch']}, {gen['device']} ({platform.machine()}), "
                f"{gen['threads']} thread(s); bound: the device's measured GEMM peak (decoding: or its copy "
                f"bandwidth for the weights, whichever is slower), i.e. 100% MFU; matmul floor: one "
                f"decode step's matrix products alone (every linear layer and the allowed rows of the output "
                f"head, with the model's own weights) timed on this device, and its ratio to transformers: "
                f"the most any decoder of these weights in this precision reaches here.")
        (RESULTS / "speed.md").write_text(f"{note}\n\n{table}\n")
        print(f"\n{table}\n\nwrote {RESULTS / 'speed.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
