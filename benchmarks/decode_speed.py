"""Text -> image decoding speed: images per second with and without the KV cache, and CFG
with conditional + unconditional rows in ONE batch vs two separate passes per step.

    python benchmarks/decode_speed.py                      # demo preset, CPU
    python benchmarks/decode_speed.py --preset 350m --tokens-per-image 1024 --device cuda --dtype bfloat16

Random weights (speed does not depend on them). Only the transformer is timed: the VQ
decoder's cost is the same for every method. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch

from cm3leon.decode.generate import attention_mask, decode_one_token, generate, left_pad, position_ids, prefill
from cm3leon.decode.guidance import Guidance, cfg_logits
from cm3leon.model.positions import next_positions
from cm3leon.decode.processors import ImageConstraint, SamplerSettings, sample
from cm3leon.model.config import ModelConfig
from cm3leon.model.transformer import CM3LeonTransformer
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.utils.io import write_json


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def cfg_two_passes(model_c, model_u, cond, uncond, constraint, sampler, scale, seed):
    """CFG the slow way: the conditional and unconditional streams each run their own forward
    per step (two models sharing weights, each with its own cache)."""
    device = next(model_c.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    steps = constraint.length
    outs = []
    states = []
    for m, prompts in ((model_c, cond), (model_u, uncond)):
        tokens, pad = left_pad(prompts, 0, device)
        total = tokens.size(1) + steps
        m.setup_caches(len(prompts), total, device=device)
        positions = position_ids(tokens, pad, m.config)
        logits = prefill(m, tokens, pad, total, positions)
        states.append([m, [positions[:, -1], tokens[:, -1]], torch.tensor([tokens.size(1)], device=device),
                       attention_mask(pad, 1, total), logits])
    for step in range(steps):
        mask = constraint.mask(step, device)
        nxt = sample(cfg_logits(states[0][4].float(), states[1][4].float(), scale) + mask, sampler, gen)
        outs.append(nxt)
        if step + 1 == steps:
            break
        for st in states:
            m, last, pos, amask, _ = st
            last[0] = next_positions(last[0], last[1], m.config)
            last[1] = nxt
            st[4] = decode_one_token(m, nxt[:, None], pos, last[0][:, None], amask)
            pos += 1
    for m in (model_c, model_u):
        m.reset_caches()
    return torch.stack(outs, 1)


def _time(fn, device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo", help="model preset (default demo)")
    ap.add_argument("--text-vocab", type=int, default=1024)
    ap.add_argument("--image-vocab", type=int, default=512)
    ap.add_argument("--tokens-per-image", type=int, default=64, help="demo: 8x8 codes")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4, help="images per call")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--skip-uncached", action="store_true", help="skip the (slow) no-cache run")
    ap.add_argument("--out", default="benchmarks/results/decode_speed.json")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    vocab = Vocab(args.text_vocab, args.image_vocab)
    torch.manual_seed(0)
    model = CM3LeonTransformer(ModelConfig.from_preset(args.preset, vocab_size=vocab.size)).to(device, dtype).eval()
    twin = copy.deepcopy(model)
    B, P, N = args.batch, args.prompt_len, args.tokens_per_image
    g = torch.Generator().manual_seed(0)
    cond = [[1] + (torch.randint(vocab.text_offset, vocab.image_offset, (P,), generator=g)).tolist() + [2]
            for _ in range(B)]
    uncond = [[1, vocab.mask_id(0), 2]] * B
    constraint = ImageConstraint(vocab, model.config.vocab_size, N)
    sampler = SamplerSettings(temperature=1.0, top_p=0.9)
    cfg = Guidance("cfg", cfg_scale=3.0)

    runs = {
        "no guidance, KV cache": lambda: generate(model, cond, constraint, sampler=sampler, seed=0),
        "no guidance, no cache": lambda: generate(model, cond, constraint, sampler=sampler, seed=0, use_cache=False),
        "CFG, one batch (2B rows), KV cache": lambda: generate(
            model, cond, constraint, sampler=sampler, guidance=cfg, guidance_prompts=[uncond], seed=0),
        "CFG, two separate passes, KV cache": lambda: cfg_two_passes(
            model, twin, cond, uncond, constraint, sampler, cfg.cfg_scale, 0),
        "CD-K, one batch (2B rows), KV cache": lambda: generate(
            model, cond, constraint, sampler=SamplerSettings(1.0), guidance=Guidance("cdk"),
            guidance_prompts=[uncond], seed=0),
    }
    if args.skip_uncached:
        runs.pop("no guidance, no cache")
    results = []
    for name, fn in runs.items():
        sec = _time(fn, device, args.repeats)
        results.append({"run": name, "seconds": round(sec, 4), "images_per_s": round(B / sec, 3),
                        "tokens_per_s": round(B * (N + 1) / sec, 1)})
    info = {
        "preset": args.preset, "params": model.num_parameters(), "tokens_per_image": N, "batch": B,
        "prompt_len": P + 2, "device": str(device), "dtype": args.dtype, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "results": results,
    }
    w = max(len(r["run"]) for r in results)
    print(f"{args.preset} ({model.num_parameters() / 1e6:.1f}M params), {N} tokens/image, batch {B}, "
          f"{device} {args.dtype}")
    print(f"{'run':<{w}}  {'s/batch':>8}  {'images/s':>9}  {'tokens/s':>9}")
    for r in results:
        print(f"{r['run']:<{w}}  {r['seconds']:>8.3f}  {r['images_per_s']:>9.2f}  {r['tokens_per_s']:>9.1f}")
    out = Path(args.out)
    write_json(out, info)
    print(f"wrote {out}")
    return info


if __name__ == "__main__":
    main()
