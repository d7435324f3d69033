"""Images per second: `CM3Leon.sample_images` against the exported model in plain
`transformers` (`CM3LeonOPTForCausalLM.generate` + the `cm3leon.hf` processors), same prompts,
same CFG, same seed — and a check that both wrote the same codes.

    python benchmarks/hf_generate.py [--model runs/demo/sft] [--batch 8] [--repeats 3]

Writes benchmarks/results/hf_generate.json. Without a model directory (run `make demo`
first) it says so and exits 0. `vllm_serve.py` times vLLM against the same two with the
functions here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

Draw = Callable[[int], list]  # seed -> image codes (0-based), one list per prompt


def shape_prompts(n: int) -> list[str]:
    colours, shapes = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle", "cross")
    return [f"a large {colours[i % 4]} {shapes[(i // 4) % 4]}" for i in range(n)]


def cm3leon_draw(model_dir, prompts: list[str], cfg_scale: float, temperature: float = 1.0,
                 top_p: float | None = 0.9, device: str = "cpu") -> Draw:
    """`CM3Leon.sample_images` on our model directory."""
    from cm3leon.api import CM3Leon

    ours = CM3Leon.from_pretrained(model_dir, device=device)

    def draw(seed: int) -> list:
        return [list(s.codes) for s in ours.sample_images(
            prompts, method="cfg", cfg_scale=cfg_scale, temperature=temperature, top_p=top_p, seed=seed,
            num_retrieved=0)]
    return draw


def transformers_draw(hf_dir, prompts: list[str], cfg_scale: float, temperature: float = 1.0,
                      top_p: float | None = 0.9, device: str = "cpu") -> Draw:
    """`transformers`' `generate` on an exported directory with the `cm3leon.hf` processors."""
    import torch
    from transformers import LogitsProcessorList

    from cm3leon.hf import BatchedCFGLogitsProcessor, CM3LeonOPTForCausalLM, build_image_prompt

    hf = CM3LeonOPTForCausalLM.from_pretrained(hf_dir).to(device).eval()
    batch = build_image_prompt(hf_dir, prompts)
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    offset = batch.constraint.vocab.image_offset

    def draw(seed: int) -> list:
        cfg = BatchedCFGLogitsProcessor(cfg_scale, batch.constraint, temperature=temperature, top_p=top_p, seed=seed)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=batch.length,
                              logits_processor=LogitsProcessorList([cfg]))
        return (out[: len(prompts), batch.prompt_length:-1] - offset).tolist()
    return draw


def best_times(draws: dict[str, Draw], repeats: int) -> dict[str, float]:
    """Each draw's best wall time over `repeats` (seeds 1..repeats), interleaved, so drifts of
    the machine hit all alike. Run each once before (the warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in draws}
    for r in range(repeats):
        for name, draw in draws.items():
            t0 = time.perf_counter()
            draw(r + 1)
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


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

    from cm3leon.convert.hf_opt import export_hf

    prompts = shape_prompts(args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(args.model, Path(tmp) / "hf")
        draws = {"cm3leon": cm3leon_draw(args.model, prompts, args.cfg_scale),
                 "transformers": transformers_draw(Path(tmp) / "hf", prompts, args.cfg_scale)}
        same = draws["cm3leon"](0) == draws["transformers"](0)  # also the warm-up
        best = best_times(draws, args.repeats)
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
