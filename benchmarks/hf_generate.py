"""Images per second: `CM3Leon.sample_images` against the exported model in plain
`transformers` (`CM3LeonOPTForCausalLM.generate` + the `cm3leon.hf` processors), same prompts,
same CFG, same seed — and a check that both wrote the same codes.

    python benchmarks/hf_generate.py [--model runs/demo/sft] [--batch 8] [--repeats 3]

Writes benchmarks/results/hf_generate.json. Without a model directory (run `make demo`
first) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/demo/sft")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "hf_generate.json"))
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        print(f"skipped: no model directory at {args.model} (run `make demo` first)")
        return 0

    import torch
    from transformers import LogitsProcessorList

    from cm3leon.api import CM3Leon
    from cm3leon.convert.hf_opt import export_hf
    from cm3leon.hf import BatchedCFGLogitsProcessor, CM3LeonOPTForCausalLM, build_image_prompt

    colours, shapes = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle", "cross")
    prompts = [f"a large {colours[i % 4]} {shapes[(i // 4) % 4]}" for i in range(args.batch)]
    ours = CM3Leon.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(args.model, Path(tmp) / "hf")
        hf = CM3LeonOPTForCausalLM.from_pretrained(Path(tmp) / "hf").eval()
        batch = build_image_prompt(Path(tmp) / "hf", prompts)

        def run_ours(seed):
            return [list(s.codes) for s in ours.sample_images(
                prompts, method="cfg", cfg_scale=args.cfg_scale, temperature=1.0, top_p=0.9, seed=seed,
                num_retrieved=0)]

        def run_hf(seed):
            cfg = BatchedCFGLogitsProcessor(args.cfg_scale, batch.constraint, temperature=1.0, top_p=0.9, seed=seed)
            with torch.no_grad():
                out = hf.generate(batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                                  max_new_tokens=batch.length, logits_processor=LogitsProcessorList([cfg]))
            return (out[: len(prompts), batch.prompt_length:-1] - ours.vocab.image_offset).tolist()

        same = run_ours(0) == run_hf(0)  # also the warm-up
        times = {"cm3leon": [], "transformers": []}
        for r in range(args.repeats):  # interleaved, so drifts of the machine hit both alike
            for name, fn in (("cm3leon", run_ours), ("transformers", run_hf)):
                t0 = time.perf_counter()
                fn(r + 1)
                times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    result = {"model": args.model, "batch": args.batch, "cfg_scale": args.cfg_scale, "same_codes": same,
              "images_per_s": {k: round(args.batch / v, 2) for k, v in best.items()},
              "speedup_vs_transformers": round(best["transformers"] / best["cm3leon"], 2),
              "threads": torch.get_num_threads()}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
