"""Text -> image decoding speed with classifier-free guidance: ours against transformers.

Ours: `cm3leon.decode.generate` with `Guidance("cfg")`, the conditional and unconditional rows
in ONE batch over the static KV cache. Reference: the SAME weights exported with
`cm3leon.convert.hf_opt.export_hf`, run by `OPTForCausalLM.generate(..., guidance_scale=...,
negative_prompt_ids=...)`. For a decoder-only model transformers applies
`UnbatchedClassifierFreeGuidanceLogitsProcessor`: the unconditional prompt runs as a second
forward pass per step inside the logits processor (its own cache); the batched
`ClassifierFreeGuidanceLogitsProcessor` (unconditional rows in the second half of the batch) is
only wired into MusicGen / Janus. The script records which processor generate actually built.

Both sides get the same prompts (`<eos> text <break>`, unconditional `<eos> <mask:0> <break>`,
paper Sec. 3), the same image-code constraint (applied after guidance, as ours does), the same
sampling (greedy by default, or --top-p), and make the same number of new tokens; only
generated tokens are counted. With greedy decoding the two outputs are also compared.

    python benchmarks/generate.py                           # demo preset: 64- and 1,024-token images
    python benchmarks/generate.py --device cuda --dtype bfloat16   # also: 7b, s per 1,024-token image

Random weights, re-drawn from N(0, 0.02): the paper's init zeroes the output projections,
which would make every position's logits depend on the last token only. On a CUDA GPU the
script also times the `7b` preset in bf16 (paper: 11.8 s per image).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

# the decode benchmark's timing helpers (same folder, on sys.path when run as a script)
from decode_speed import _sync, _time

from cm3leon.convert.hf_opt import export_hf
from cm3leon.decode.generate import generate
from cm3leon.decode.guidance import Guidance
from cm3leon.decode.processors import ImageConstraint, SamplerSettings
from cm3leon.errors import CM3LeonError
from cm3leon.model.config import PAPER_VOCAB_SIZE, ModelConfig
from cm3leon.model.transformer import CM3LeonTransformer
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.utils.io import write_json

PAPER_SECONDS_PER_IMAGE_7B = 11.8  # paper: 7B, bf16, one 256x256 image (1,024 tokens) with CFG


def make_prompts(vocab: Vocab, batch: int, prompt_len: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """B conditional prompts `<eos> text <break>` (random text ids, all the same length) and
    the unconditional ones `<eos> <mask:0> <break>`."""
    g = torch.Generator().manual_seed(seed)
    cond = [[vocab.eos_id] + torch.randint(vocab.text_offset, vocab.image_offset, (prompt_len,), generator=g).tolist()
            + [vocab.break_id] for _ in range(batch)]
    uncond = [[vocab.eos_id, vocab.mask_id(0), vocab.break_id] for _ in range(batch)]
    return cond, uncond


def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype, std: float = 0.02) -> CM3LeonTransformer:
    """A model with every weight drawn from N(0, std), built on `meta` and materialised on `device`."""
    with torch.device("meta"):
        model = CM3LeonTransformer(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def hf_constraint_processor(constraint: ImageConstraint, prompt_len: int):
    """Our image constraint as a transformers LogitsProcessor (the same additive mask per step)."""
    from transformers import LogitsProcessor

    class ConstraintProcessor(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return scores + constraint.mask(input_ids.shape[1] - prompt_len, scores.device)

    return ConstraintProcessor()


class HFCFG:
    """`OPTForCausalLM.generate` with guidance_scale and negative_prompt_ids."""

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype, cond, uncond, constraint,
                 scale: float, new_tokens: int, top_p: float | None, cache: str):
        from transformers import LogitsProcessorList, OPTForCausalLM

        self.model = OPTForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.input_ids = torch.tensor(cond, device=device)
        self.uncond_ids = torch.tensor(uncond, device=device)
        self.kwargs = {
            "attention_mask": torch.ones_like(self.input_ids),
            "negative_prompt_ids": self.uncond_ids,
            "negative_prompt_attention_mask": torch.ones_like(self.uncond_ids),
            "guidance_scale": scale, "max_new_tokens": new_tokens,
            "logits_processor": LogitsProcessorList([hf_constraint_processor(constraint, self.input_ids.shape[1])]),
            "do_sample": top_p is not None, "pad_token_id": 0, "use_cache": True,
        }
        if top_p is not None:  # top_k=0: transformers' default top-k of 50 would filter more than ours
            self.kwargs.update(top_p=top_p, top_k=0, temperature=1.0)
        if cache == "static":
            self.kwargs["cache_implementation"] = "static"

    @torch.no_grad()
    def __call__(self, max_new_tokens: int | None = None) -> torch.Tensor:
        kw = dict(self.kwargs)
        if max_new_tokens is not None:
            kw.update(max_new_tokens=max_new_tokens)
        out = self.model.generate(self.input_ids, **kw)
        return out[:, self.input_ids.shape[1]:]  # generated tokens only

    def probe(self) -> dict:
        """Run 3 steps and record the processors generate built and the rows per forward pass."""
        built, rows = [], []
        original = self.model._get_logits_processor

        def spy(*args, **kwargs):
            processors = original(*args, **kwargs)
            built.extend(type(p).__name__ for p in processors)
            return processors

        self.model._get_logits_processor = spy
        hook = self.model.model.decoder.register_forward_pre_hook(
            lambda mod, args, kwargs: rows.append(int((args[0] if args else kwargs["input_ids"]).shape[0])),
            with_kwargs=True)
        try:
            self(max_new_tokens=3)
        finally:
            hook.remove()
            del self.model._get_logits_processor
        return {"processors": built, "forward_rows": rows, "forwards_per_step": len(rows) / 3}


def bench_case(args, vocab: Vocab, tokens_per_image: int, device, dtype, batch: int) -> dict:
    """One model size / image length: ours and transformers on the same weights and prompts."""
    cond, uncond = make_prompts(vocab, batch, args.prompt_len)
    needed = len(cond[0]) + tokens_per_image
    base = ModelConfig.from_preset(args.preset, vocab_size=vocab.size)
    max_seq_len = max(base.max_seq_len, 1 << (needed - 1).bit_length())  # raise the context to fit
    config = base.replace(max_seq_len=max_seq_len)
    torch.manual_seed(0)
    model = random_model(config, device, dtype)
    constraint = ImageConstraint(vocab, config.vocab_size, tokens_per_image, end_with_break=False)
    sampler = SamplerSettings(temperature=0.0) if args.top_p is None else SamplerSettings(1.0, top_p=args.top_p)
    guidance = Guidance("cfg", cfg_scale=args.cfg_scale)

    def ours(m=model, **kw):
        return generate(m, cond, constraint, sampler=sampler, guidance=guidance, guidance_prompts=[uncond], seed=0,
                        **kw)

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, Path(tmp) / "hf", dtype=dtype)
        hf = HFCFG(Path(tmp) / "hf", device, dtype, cond, uncond, constraint, args.cfg_scale, tokens_per_image,
                   args.top_p, args.hf_cache)
    probe = hf.probe()
    ours_tokens = torch.tensor(ours().tokens)
    hf_tokens = hf().cpu()
    assert tuple(ours_tokens.shape) == tuple(hf_tokens.shape) == (batch, tokens_per_image), (
        f"generated {tuple(ours_tokens.shape)} (ours) and {tuple(hf_tokens.shape)} (transformers), "
        f"expected {(batch, tokens_per_image)}")
    assert bool(((hf_tokens >= vocab.image_offset) & (hf_tokens < vocab.size)).all()), "transformers emitted non-image ids"
    distinct = int(ours_tokens.unique().numel())  # a degenerate model would agree trivially
    agreement = (ours_tokens == hf_tokens).float().mean().item() if args.top_p is None else None
    first_diff = None
    if args.top_p is None:
        diff = (ours_tokens != hf_tokens).any(0).nonzero()
        first_diff = int(diff[0]) if len(diff) else None
    # Variants of ours, timed side by side with the reference in this run (interleaved).
    variants = {"ours": ours}
    compile_s = None
    if not args.skip_compile:
        t0 = time.perf_counter()
        compiled_tokens = torch.tensor(ours(compile=True).tokens)  # compiles (timed apart from the warm runs)
        _sync(device)
        compile_s = time.perf_counter() - t0
        assert torch.equal(compiled_tokens, ours_tokens) or args.top_p is not None, "compiled decoding changed tokens"
        variants["ours, compiled"] = lambda: ours(compile=True)
    bf16_agreement = None
    if not args.skip_bf16 and dtype == torch.float32:
        low = random_model(config, device, torch.bfloat16)
        low.load_state_dict(model.state_dict())
        low_tokens = torch.tensor(ours(low).tokens)
        bf16_agreement = round((low_tokens == ours_tokens).float().mean().item(), 4) if args.top_p is None else None
        variants["ours, bf16 weights"] = lambda: ours(low)
    times = _time_interleaved({"hf": hf, **variants}, device, args.repeats)
    hf_s, ours_s = times.pop("hf"), times["ours"]
    generated = batch * tokens_per_image
    bound_s = _bound_seconds(config, 2 * batch, tokens_per_image, len(cond[0]), constraint, device, dtype)
    floor_s = _matmul_floor_seconds(model, 2 * batch, tokens_per_image, constraint, device)
    return {
        "preset": args.preset, "params_m": round(model.num_parameters() / 1e6, 2), "max_seq_len": max_seq_len,
        "vocab_size": vocab.size, "tokens_per_image": tokens_per_image, "batch": batch,
        "prompt_tokens": len(cond[0]), "cfg_scale": args.cfg_scale,
        "ours_s": round(ours_s, 3), "ours_tokens_per_s": round(generated / ours_s, 1),
        "hf_s": round(hf_s, 3), "hf_tokens_per_s": round(generated / hf_s, 1),
        "speedup": round(hf_s / ours_s, 2),
        "greedy_token_agreement": None if agreement is None else round(agreement, 4),
        "greedy_first_divergence_step": first_diff, "distinct_tokens_ours": distinct,
        "variants": {k: {"s": round(v, 3), "tokens_per_s": round(generated / v, 1), "speedup": round(hf_s / v, 2)}
                     for k, v in times.items()},
        "compile_s": None if compile_s is None else round(compile_s, 1),
        "bf16_greedy_agreement_with_fp32": bf16_agreement,
        "bound_s": round(bound_s, 4), "bound_tokens_per_s": round(generated / bound_s, 1),
        "matmul_floor_s": round(floor_s, 4), "matmul_floor_tokens_per_s": round(generated / floor_s, 1),
        "matmul_floor_over_hf": round(hf_s / floor_s, 2),
        "hf_guidance": [p for p in probe["processors"] if "Guidance" in p],
        "hf_forwards_per_step": probe["forwards_per_step"], "hf_rows_per_forward": sorted(set(probe["forward_rows"])),
    }


def _time_interleaved(fns: dict, device, repeats: int) -> dict:
    """Best seconds of each callable over `repeats` rounds, each round calling every one in
    turn (after one warm-up call each), so that a load change on a shared machine hits all alike."""
    for fn in fns.values():
        fn()
    _sync(device)
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _bound_seconds(config: ModelConfig, rows: int, steps: int, prompt_len: int, constraint, device, dtype) -> float:
    """A lower bound on one call's decoding time: every step's matmul FLOPs (the blocks, the
    attention over the cache, the output head's allowed rows) at this device's measured GEMM
    peak, or the weights read once per step at the measured copy bandwidth, whichever is slower."""
    from cm3leon.train.flops import measure_matmul_tflops

    d, L = config.d_model, config.n_layer
    block = L * (4 * d * d + config.mlp_matrices * d * config.ffn_dim)
    head = constraint.span(constraint.mask(0, "cpu"))
    head_rows = (head[1] - head[0]) if head else config.vocab_size
    ctx = prompt_len + steps / 2  # mean cache length attended over
    flops = steps * rows * (2 * (block + head_rows * d) + 4 * L * d * ctx)
    peak = measure_matmul_tflops(device, dtype) * 1e12
    size = 1 << 25  # 128 MiB of fp32 (past the caches): a memcpy's bandwidth
    a, b = torch.empty(size, device=device), torch.empty(size, device=device)
    b.copy_(a)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        b.copy_(a)
    _sync(device)
    bandwidth = 3 * 2 * a.numel() * a.element_size() / (time.perf_counter() - t0)  # read + write
    weight_bytes = (block + head_rows * d) * torch.empty((), dtype=dtype).element_size()
    return max(flops / peak, steps * weight_bytes / bandwidth)


@torch.no_grad()
def _matmul_floor_seconds(model, rows: int, steps: int, constraint, device, repeats: int = 20) -> float:
    """What one call's steps cost in their matrix products alone: every linear layer of the
    model and the output head's allowed rows applied to `rows` vectors (what a decode step
    cannot skip), with the model's own weight tensors, timed here (best of `repeats` passes
    over all the weights, so they stream from memory as in decoding), times `steps`. No
    decoder that reads these weights in this precision runs faster on this device; its ratio
    to transformers' speed is the most any decoding speed-up of this model can reach here."""
    head = model.tok_embeddings.weight if model.lm_head is None else model.lm_head.weight
    span = constraint.span(constraint.mask(0, device))
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights.append(head[span[0]:span[1]] if span else head[: model.config.vocab_size])
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], device=device, dtype=w.dtype) for w in weights}

    def one_step():
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    return steps * _time(one_step, device, repeats)


def bench_7b(args, device) -> dict:
    """Seconds per 1,024-token image with CFG for the paper's 7B size in bf16 (random weights)."""
    vocab = Vocab(56_320, 8_192)
    if vocab.size != PAPER_VOCAB_SIZE:
        raise CM3LeonError(f"paper vocabulary mismatch: {vocab.size} != {PAPER_VOCAB_SIZE}")
    config = ModelConfig.from_preset("7b")
    torch.manual_seed(0)
    model = random_model(config, device, torch.bfloat16, std=0.006)
    cond, uncond = make_prompts(vocab, 1, args.prompt_len)
    constraint = ImageConstraint(vocab, config.vocab_size, 1024, end_with_break=False)
    sampler = SamplerSettings(1.0, top_p=0.9)  # TopP + CFG, one of the paper's two samplers
    guidance = Guidance("cfg", cfg_scale=args.cfg_scale)
    seconds = _time(lambda: generate(model, cond, constraint, sampler=sampler, guidance=guidance,
                                     guidance_prompts=[uncond], seed=0), device, 1)
    row = {"preset": "7b", "params_b": round(model.num_parameters() / 1e9, 2), "dtype": "bfloat16",
           "tokens_per_image": 1024, "images_per_call": 1, "seconds_per_image": round(seconds, 2),
           "paper_seconds_per_image": PAPER_SECONDS_PER_IMAGE_7B, "gpu": torch.cuda.get_device_name(device)}
    return row


def _floor_cell(r: dict) -> str:
    if r.get("matmul_floor_tokens_per_s") is None:
        return "-"
    return f"{r['matmul_floor_tokens_per_s']:.0f} ({r['matmul_floor_over_hf']:.2f}x)"


def markdown_table(rows: list[dict]) -> str:
    head = ("| preset | params (M) | image tokens | batch | ours | ours tok/s | transformers tok/s "
            "| ours / transformers | matmul floor tok/s (its ratio) | bound tok/s | greedy agreement |\n"
            "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    lines = []
    for r in rows:
        agree = "-" if r["greedy_token_agreement"] is None else f"{100 * r['greedy_token_agreement']:.1f}%"
        for name, v in r.get("variants", {"ours": {"tokens_per_s": r["ours_tokens_per_s"],
                                                   "speedup": r["speedup"]}}).items():
            note = agree
            if name == "ours, compiled" and r.get("compile_s") is not None:
                note += f" (compile {r['compile_s']:.0f} s, not timed)"
            if name == "ours, bf16 weights":
                b = r.get("bf16_greedy_agreement_with_fp32")
                note = "-" if b is None else f"{100 * b:.1f}% of fp32's tokens"
            lines.append(f"| {r['preset']} | {r['params_m']} | {r['tokens_per_image']} | {r['batch']} | {name} | "
                         f"{v['tokens_per_s']:.1f} | {r['hf_tokens_per_s']:.1f} | {v['speedup']:.2f}x | "
                         f"{_floor_cell(r)} | {r.get('bound_tokens_per_s', float('nan')):.0f} | {note} |")
    return "\n".join([head, *lines])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo", help="model preset (default demo)")
    ap.add_argument("--text-vocab", type=int, default=1024, help="BPE size (the demo's: 1,024)")
    ap.add_argument("--image-vocab", type=int, default=1024, help="image codes (demo32: 1,024)")
    ap.add_argument("--tokens-per-image", type=int, nargs="+", default=[64, 1024], help="image lengths to time")
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 1],
                    help="images per call, one per --tokens-per-image (or one for all)")
    ap.add_argument("--prompt-len", type=int, default=16, help="text tokens per prompt")
    ap.add_argument("--cfg-scale", type=float, default=3.0)
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling on both sides (default: greedy)")
    ap.add_argument("--hf-cache", default="dynamic", choices=["dynamic", "static"],
                    help="transformers' cache for the conditional pass")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls after one warm-up (best is kept)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--skip-7b", action="store_true", help="on CUDA, skip the 7b timing")
    ap.add_argument("--skip-compile", action="store_true", help="skip the compiled-decoding variant")
    ap.add_argument("--skip-bf16", action="store_true", help="skip the bf16-weights variant")
    ap.add_argument("--out", default="benchmarks/results/generate.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if len(args.batch) not in (1, len(args.tokens_per_image)):
        raise CM3LeonError("--batch: give one value, or one per --tokens-per-image")
    if args.repeats < 1 or args.prompt_len < 1 or min(args.batch) < 1 or min(args.tokens_per_image) < 1:
        raise CM3LeonError("--repeats, --prompt-len, --batch and --tokens-per-image must be >= 1")

    import transformers

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    vocab = Vocab(args.text_vocab, args.image_vocab)
    batches = args.batch * len(args.tokens_per_image) if len(args.batch) == 1 else args.batch
    t0 = time.perf_counter()
    rows = [bench_case(args, vocab, n, device, dtype, b) for n, b in zip(args.tokens_per_image, batches)]
    big = bench_7b(args, device) if device.type == "cuda" and torch.cuda.is_available() and not args.skip_7b else None
    info = {
        "device": str(device), "dtype": args.dtype, "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "sampling": "greedy" if args.top_p is None else f"top_p={args.top_p}", "hf_cache": args.hf_cache,
        "repeats": args.repeats, "results": rows, "7b": big, "wall_s": round(time.perf_counter() - t0, 1),
    }
    _sync(device)
    print(f"text->image with CFG {args.cfg_scale}, {info['sampling']}, {device} {args.dtype}, "
          f"{torch.get_num_threads()} threads; vocab {vocab.size} ({args.text_vocab} text + {args.image_vocab} image "
          f"+ {vocab.num_special} specials); random weights")
    print(markdown_table(rows))
    for r in rows:
        print(f"transformers guidance for {r['tokens_per_image']}-token images: {', '.join(r['hf_guidance'])} "
              f"({r['hf_forwards_per_step']:g} forwards per step, rows {r['hf_rows_per_forward']}); "
              f"ours: 1 forward per step of {2 * r['batch']} rows")
    if big is not None:
        print(f"7b ({big['params_b']}B, bf16, {big['gpu']}): {big['seconds_per_image']:.2f} s per 1,024-token image "
              f"with CFG (paper: {PAPER_SECONDS_PER_IMAGE_7B} s)")
    out = Path(args.out)
    write_json(out, info)
    print(f"wrote {out}")
    return info


if __name__ == "__main__":
    main()
