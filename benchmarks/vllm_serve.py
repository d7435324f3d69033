"""Text -> image in vLLM with the image-code constraint and CFG (`cm3leon.vllm`: two requests
per image, one logits processor), timed against `CM3Leon.sample_images` and `transformers`'
`generate` (`hf_generate.py`'s functions) on the same prompts in one process; the vLLM images
decoded by `codes_to_image` and saved as PNGs.

    pip install 'vllm>=0.34'                                # Linux, NVIDIA CUDA GPU
    cm3leon export hf --model RUN/sft --out runs/hf         # a model with plain positions
    python benchmarks/vllm_serve.py --hf runs/hf [--prompts "a red circle" ...] [--cfg-scale 1.5]
        [--temperature 1] [--top-p 0.9] [--seed 0] [--repeats 3]

images/s: prompts / the best wall time of drawing their codes (as hf_generate.py; start-up and
the image tokenizer's decoding apart). Writes benchmarks/results/vllm_serve.json and
vllm_serve.md, and the first run's images (seed --seed, image i drawn with seed + i) to --images. Exits 2 with one line when vLLM is missing
or the model has segment positions (vLLM's OPT cannot give them), 1 when a CFG pair's two
sequences differ.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

# the transformers benchmark's functions (same folder, on sys.path when run as a script)
from hf_generate import best_times, cm3leon_draw, shape_prompts, transformers_draw

RESULTS = Path(__file__).parent / "results"
VLLM_MIN = (0, 34)  # the Model Runner V2 logits-processor interface cm3leon.vllm is written against


def vllm_problem() -> str | None:
    """Why vLLM cannot run this recipe here (one line), or None."""
    try:
        import vllm
    except ImportError:
        return ("vLLM is not installed: pip install 'vllm>=0.34' on a Linux machine with an NVIDIA CUDA GPU "
                "(PyPI's vllm wheels are CUDA builds; a machine without one needs vLLM's CPU backend built from source)")
    except Exception as e:  # an install that cannot load, e.g. without its CUDA libraries
        return f"vLLM could not be imported ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    version = getattr(vllm, "__version__", "")
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or (int(m[1]), int(m[2])) < VLLM_MIN:
        return (f"vLLM {version or '(unknown version)'} is too old: cm3leon.vllm uses the logits-processor "
                "interface of vLLM >= 0.34 (pip install 'vllm>=0.34')")
    return None


def vllm_draw(llm, hf_dir, prompts: list[str], cfg_scale: float, temperature: float, top_p: float | None):
    """Draw (seed -> codes per prompt) with vLLM's offline `LLM` loaded with cm3leon.vllm.PROCESSOR;
    raises CM3LeonError when a pair's two sequences differ (`pair_codes`)."""
    from vllm import SamplingParams, TokensPrompt

    from cm3leon.hf import ImageTokenConstraint
    from cm3leon.vllm import image_requests, pair_codes

    base = image_requests(hf_dir, prompts, cfg_scale, temperature, top_p)  # pairs 0..B-1, tokenized once
    constraint = ImageTokenConstraint.from_export(hf_dir)
    token_prompts = [TokensPrompt(prompt_token_ids=ids) for ids in base.prompt_token_ids]
    first_pairs = itertools.count(0, len(prompts))  # pair ids unique over the engine's life

    def draw(seed: int) -> list:
        first = next(first_pairs)
        requests = [replace(r, pair=first + r.pair, seed=seed + r.pair) for r in base.requests]
        # greedy: the processor leaves one finite logit per row, the pair's own draw
        params = [SamplingParams(temperature=0.0, max_tokens=base.length, ignore_eos=True, detokenize=False,
                                 extra_args=r.to_extra_args()) for r in requests]
        outs = llm.generate(token_prompts, params, use_tqdm=False)
        return pair_codes([o.outputs[0].token_ids for o in outs], requests, constraint)
    return draw


def markdown(result: dict) -> str:
    from cm3leon.eval.report import markdown_table

    ips = result["images_per_s"]
    rows = [{"engine": name, "device": result["devices"][name], "images/s": v,
             "vs vLLM": f"{v / ips['vllm']:.2f}x"} for name, v in ips.items()]
    head = (f"vLLM {result['vllm_version']} ({result['dtype']}) against CM3Leon and transformers: "
            f"{len(result['prompts'])} prompts, CFG {result['cfg_scale']}, temperature {result['temperature']}, "
            f"top-p {result['top_p']}, best of {result['repeats']}; vLLM start-up {result['vllm_startup_s']} s apart.\n\n")
    return head + markdown_table(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", default="runs/hf", help="an exported model directory (cm3leon export hf)")
    ap.add_argument("--prompts", nargs="+", help="texts to draw (default: --batch shape captions)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", help="vLLM's weights and activations (ours run in float32)")
    ap.add_argument("--device", default=None, help="for CM3Leon and transformers (default: cuda if present)")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0,
                    help="vLLM's KV cache (it would take the GPU's free memory, leaving none for the others)")
    ap.add_argument("--images", default="runs/vllm_serve", help="folder for the PNGs")
    ap.add_argument("--out", default=str(RESULTS / "vllm_serve.json"))
    args = ap.parse_args(argv)

    from cm3leon.errors import CM3LeonError
    from cm3leon.vllm import check_plain_positions

    if not (Path(args.hf) / "config.json").is_file():
        print(f"vllm_serve: no exported model at {args.hf} (cm3leon export hf --model RUN/sft --out {args.hf})")
        return 2
    try:
        check_plain_positions(args.hf)
    except CM3LeonError as e:
        print(f"vllm_serve: {e}")
        return 2
    problem = vllm_problem()
    if problem:
        print(f"vllm_serve: {problem}")
        return 2

    import torch
    import vllm
    from vllm import LLM

    from cm3leon.convert.hf_opt import import_hf
    from cm3leon.hf import ImageTokenConstraint, codes_to_image
    from cm3leon.utils.io import write_json, write_text
    from cm3leon.vllm import PROCESSOR, image_requests

    prompts = args.prompts or shape_prompts(args.batch)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompt_tokens = sum(len(ids) for ids in image_requests(args.hf, prompts, args.cfg_scale).prompt_token_ids)
    t0 = time.perf_counter()
    # every request of a run in one step from the first: a pair's two rows stay in step
    llm = LLM(model=str(args.hf), skip_tokenizer_init=True, dtype=args.dtype, seed=args.seed,
              logits_processors=[PROCESSOR], max_num_seqs=2 * len(prompts),
              max_num_batched_tokens=max(8192, prompt_tokens), kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30))
    startup = time.perf_counter() - t0
    sampling = dict(cfg_scale=args.cfg_scale, temperature=args.temperature, top_p=args.top_p)
    with tempfile.TemporaryDirectory() as tmp:
        import_hf(args.hf, Path(tmp) / "ours")  # CM3Leon's own directory, the same weights
        draws = {"vllm": vllm_draw(llm, args.hf, prompts, **sampling),
                 "cm3leon": cm3leon_draw(Path(tmp) / "ours", prompts, **sampling, device=device),
                 "transformers": transformers_draw(args.hf, prompts, **sampling, device=device)}
        try:
            first = {name: draw(args.seed) for name, draw in draws.items()}  # also the warm-up
            best = best_times(draws, args.repeats)
        except CM3LeonError as e:
            print(f"vllm_serve: {e}")
            return 1
    offset = ImageTokenConstraint.from_export(args.hf).vocab.image_offset
    out_dir = Path(args.images)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = []
    for i, image in enumerate(codes_to_image(args.hf, torch.tensor(first["vllm"]) + offset)):
        pngs.append(str(out_dir / f"{i:03d}.png"))
        image.save(pngs[-1])
    # ours draws a batch from one generator, vLLM image i from seed + i: alike when greedy or one prompt
    comparable = args.temperature == 0 or len(prompts) == 1
    result = {
        "hf": args.hf, "prompts": prompts, **sampling, "seed": args.seed, "repeats": args.repeats,
        "vllm_version": vllm.__version__, "dtype": args.dtype,
        "devices": {"vllm": torch.cuda.get_device_name() if torch.cuda.is_available() else "?",
                    "cm3leon": device, "transformers": device},
        "images_per_s": {name: round(len(prompts) / t, 2) for name, t in best.items()},
        "vllm_startup_s": round(startup, 1),
        "pairs_equal": True,  # pair_codes raised otherwise
        "vllm_images_equal_cm3leon": (sum(a == b for a, b in zip(first["vllm"], first["cm3leon"]))
                                      if comparable else None),
        "cm3leon_equal_transformers": first["cm3leon"] == first["transformers"],
        "images": pngs,
    }
    print(json.dumps(result, indent=2))
    write_json(args.out, result)
    write_text(Path(args.out).with_suffix(".md"), markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
