"""Training the VQ image tokenizer (`cm3leon tokenizer image`).

Loss (taming VQGAN, Esser et al. 2021, https://arxiv.org/abs/2012.09841): L1 + L2
reconstruction, codebook + beta * commitment, optionally LPIPS (only from VGG weights the user
supplies) and a PatchGAN discriminator with hinge loss, adaptive weight and a delayed start.
Against codebook collapse: k-means initialisation of the codebook from encoder outputs of the
first batch, l2-normalised (cosine) or EMA codes, and restart of codes unused for a while.

Small datasets are loaded into memory once as uint8 and batches are sampled from it; batch
`s` depends only on (seed, s), so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from cm3leon.errors import CM3LeonError
from cm3leon.tokenizers.image import VQConfig, VQModel, get_preset, tensor_to_images
from cm3leon.tokenizers.image_losses import PatchDiscriminator, adaptive_weight, load_lpips, pixel_losses, roundtrip_step
from cm3leon.tokenizers.image_metrics import code_stability, codebook_stats
from cm3leon.utils.io import atomic_path, load_safetensors, read_json, remove_stale_temporaries, write_json
from cm3leon.utils.logging import MetricsLogger, progress, trim_metrics
from cm3leon.utils.presets import lookup

CHECKPOINT_DIR = "checkpoint"


@dataclass
class VQTrainConfig:
    steps: int = 1200
    batch_size: int = 32
    lr: float = 2e-3  # peak; cosine decay to lr * min_lr_ratio after a linear warmup
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    betas: tuple[float, float] = (0.9, 0.99)  # taming uses (0.5, 0.9) with its GAN from step 0
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    # Extra reconstruction weight on pixels that differ from the image's background (the
    # median colour of its border). 0 = plain per-pixel losses (taming). On sparse scenes (a few
    # small objects on a flat background, like the built-in shapes) the background dominates a
    # plain mean and small objects lose their colour and shape; weighting them fixes that.
    foreground_weight: float = 0.0
    foreground_threshold: float = 0.1  # max |pixel - background| in [-1, 1] units to count as foreground
    codebook_weight: float = 1.0
    # Round-trip phase: `roundtrip_steps` more steps after training so that an image and its
    # reconstruction, saved as 8 bits, both encode to the codes the image has now (those of a
    # frozen copy of the model, the teacher): cross-entropy over -||z - e_k||^2 / T, with T =
    # roundtrip_temperature x the median squared distance between nearest codes. The codebook
    # is frozen. With roundtrip_decoder the decoder learns too: it draws each code so that the
    # encoder can tell it from its near-duplicates after 8-bit rounding (passed straight
    # through), anchored by the reconstruction loss of the teacher's codes x
    # roundtrip_recon_weight. The encoder alone cannot separate codes whose decodes differ by
    # under 1/255 per pixel: on 64-px shapes it stalls near 80% of codes kept where, with the
    # decoder, 2,000 steps reach 96% (and PSNR rises). The phase starts a fresh optimizer state.
    # 0 steps = off (taming).
    roundtrip_steps: int = 0
    roundtrip_lr: float = 1e-3  # peak; linear warmup over this fraction of the phase, then cosine to 0
    roundtrip_warmup: float = 0.1
    roundtrip_temperature: float = 0.05
    roundtrip_decoder: bool = True
    roundtrip_recon_weight: float = 10.0
    perceptual_weight: float = 1.0  # LPIPS, only with user-supplied VGG weights
    disc_start: int | None = None  # step at which the PatchGAN loss starts; None = no GAN
    disc_weight: float = 0.8  # taming's default
    disc_layers: int = 2  # PatchGAN depth (taming: 3, for 256 px)
    disc_channels: int = 32
    kmeans_init: bool = True  # initialise the codebook by k-means on the first batch's latents
    kmeans_images: int = 256
    # architecture="patch" only: the whole fit is k-means on the training patches
    kmeans_iters: int = 30  # Lloyd iterations (only when there are more distinct patches than codes)
    kmeans_max_vectors: int = 200_000  # distinct patches clustered at most (a random sample beyond)
    hflip: bool = True  # random horizontal flips (augmentation)
    bf16: bool = False  # bf16 autocast (CPU or GPU); measure before turning it on
    log_every: int = 25
    ckpt_every: int = 200
    eval_images: int = 1000  # held-out images measured at the end
    holdout_fraction: float = 0.05  # used only when the data has no val/test split


TRAIN_PRESETS: dict[str, VQTrainConfig] = {
    "tiny": VQTrainConfig(steps=40, batch_size=16, lr=3e-3, warmup_steps=5, log_every=5, ckpt_every=20,
                          kmeans_images=64, eval_images=64),
    # about 2 minutes on one busy CPU core: small batches, many steps, cosine decay (most of the
    # PSNR arrives while the learning rate anneals)
    # about 2 minutes on 2 CPU cores. Foreground weighting keeps small objects' colour and
    # shape: on 32-px shapes scenes it lifted the checker's recovery of objects from
    # reconstructions from 19% to 71% (800 steps), 87% at 1,600 steps (colour+cell 100%).
    # The round-trip phase (200 encoder-only steps, ~10% more time) raised the codes kept by
    # encode -> decode -> encode from 72% to 78% on 32-px shapes with PSNR unchanged; the demo
    # never re-tokenizes decoded images, so demo32 leaves it off to save time.
    "demo32": VQTrainConfig(steps=1200, batch_size=16, lr=2e-3, foreground_weight=10.0),
    # demo64's short phase trains the encoder alone: at 150 steps the decoder's phase costs more
    # than it gives (round trip 80% -> 83%, PSNR -1.2 dB, checker recovery 92% -> 89%); its
    # gains come with length: `--roundtrip-steps 2000 --roundtrip-decoder` (+10 min) keeps 96%
    # of codes (1,500 steps: 95.4%) with PSNR 34.7 dB and 96% checker recovery.
    "demo64": VQTrainConfig(steps=1100, batch_size=16, lr=2e-3, foreground_weight=10.0, roundtrip_steps=150,
                            roundtrip_decoder=False),
    "patch48": VQTrainConfig(),
    "cm3leon": VQTrainConfig(steps=200_000, batch_size=32, lr=4.5e-6 * 32, betas=(0.5, 0.9), warmup_steps=1000,
                             disc_start=50_000, disc_layers=3, disc_channels=64, ckpt_every=2000, log_every=100,
                             eval_images=2000),
    "chameleon": VQTrainConfig(steps=400_000, batch_size=16, lr=4.5e-6 * 16, betas=(0.5, 0.9), warmup_steps=1000,
                               disc_start=250_001, disc_layers=3, disc_channels=64, ckpt_every=2000, log_every=100,
                               eval_images=2000),
}


def _pixel_weights(tc: VQTrainConfig) -> tuple[float, float, float, float]:
    """`pixel_losses`' weights from the training config."""
    return tc.l1_weight, tc.l2_weight, tc.foreground_weight, tc.foreground_threshold


# ---------------------------------------------------------------------------------------------
# Data


def load_images(data: str | Path, size: int, split: str | None, limit: int | None = None) -> tuple[torch.Tensor, dict]:
    """Images of one split as uint8 [N, 3, size, size] (in memory), and the reader's skip counts."""
    import numpy as np

    from cm3leon.data.readers import open_dataset

    reader = open_dataset(data, size=size, split=split)
    arrays = []
    for rec in progress(desc=f"loading {split or 'all'} images", unit="img", iterable=reader):
        arrays.append(np.asarray(rec.image.convert("RGB"), dtype=np.uint8))
        if limit is not None and len(arrays) >= limit:
            break
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous() if arrays else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return x, dict(reader.stats)


def _to_float(x_u8: torch.Tensor) -> torch.Tensor:
    return x_u8.float() / 127.5 - 1.0


def _batch(train_u8: torch.Tensor, step: int, batch_size: int, seed: int, hflip: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)  # batch = f(seed, step): resumable
    idx = torch.randint(0, train_u8.shape[0], (batch_size,), generator=g)
    x = _to_float(train_u8[idx])
    if hflip:
        flip = torch.rand(batch_size, generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
    return x


def _lr_at(step: int, tc: VQTrainConfig) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    t = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: VQModel, images_u8: torch.Tensor, batch_size: int = 250) -> tuple[dict, torch.Tensor]:
    """PSNR (dB, pixels in [0, 1]), L1 / MSE (pixels in [0, 1]), codebook usage and perplexity
    of a set of uint8 images; also returns the reconstructions as uint8."""
    model.eval()
    psnrs, l1s, mses, codes, recons = [], [], [], [], []
    for i in range(0, images_u8.shape[0], batch_size):
        x = _to_float(images_u8[i:i + batch_size])
        c = model.encode(x)
        r = model.decode(c)
        r_u8 = ((r + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # measured as the saved image
        a, b = images_u8[i:i + batch_size].float() / 255, r_u8.float() / 255
        mse = ((a - b) ** 2).mean(dim=(1, 2, 3))
        psnrs.append(10 * torch.log10(1.0 / mse.clamp(min=1e-10)))
        l1s.append((a - b).abs().mean(dim=(1, 2, 3)))
        mses.append(mse)
        codes.append(c)
        recons.append(r_u8)
    if not codes:
        raise CM3LeonError("no held-out images to evaluate")
    codes_all = torch.cat(codes)
    metrics = {
        "psnr_db": round(torch.cat(psnrs).mean().item(), 3),
        "val_l1": round(torch.cat(l1s).mean().item(), 5),
        "val_mse": round(torch.cat(mses).mean().item(), 6),
        **codebook_stats(codes_all, model.config.codebook_size),
        "num_eval_images": int(images_u8.shape[0]),
    }
    return metrics, torch.cat(recons)


def checker_recovery(originals_u8: torch.Tensor, recons_u8: torch.Tensor) -> dict | None:
    """How many of the objects the shapes checker finds in the originals it also finds in the
    reconstructions: exactly (shape, colour, size, grid cell), by colour and shape (what the
    text-to-image bar asks of a picture), and by colour and cell only. None when the checker is
    unavailable or finds nothing (not a shapes dataset)."""
    try:
        from cm3leon.data.checker import detect_objects
    except ImportError:
        return None
    found = 0
    views = {"checker_recovered": lambda d: d.key(), "checker_recovered_colour_shape": lambda d: (d.color, d.shape),
             "checker_recovered_colour_cell": lambda d: (d.color, d.cell)}
    matched = dict.fromkeys(views, 0)
    for a, b in zip(tensor_to_images(_to_float(originals_u8)), tensor_to_images(_to_float(recons_u8))):
        da, db = detect_objects(a), detect_objects(b)
        found += len(da)
        for name, view in views.items():
            left = [view(d) for d in db]
            for d in da:
                if view(d) in left:
                    left.remove(view(d))
                    matched[name] += 1
    if not found:
        return None
    return {"checker_objects": found, **{k: round(v / found, 4) for k, v in matched.items()}}


def save_reconstruction_grid(path: str | Path, originals_u8: torch.Tensor, recons_u8: torch.Tensor,
                             n: int = 16, min_side: int = 64) -> None:
    """PNG: a row of originals over a row of their reconstructions (upscaled for viewing)."""
    from PIL import Image

    n = min(n, originals_u8.shape[0])
    side = originals_u8.shape[-1]
    scale = max(1, -(-min_side // side))
    cell = side * scale
    grid = Image.new("RGB", (n * cell + (n + 1) * 2, 2 * cell + 6), (255, 255, 255))
    for row, imgs in enumerate((originals_u8, recons_u8)):
        for i, im in enumerate(tensor_to_images(_to_float(imgs[:n]))):
            grid.paste(im.resize((cell, cell), Image.NEAREST), (2 + i * (cell + 2), 2 + row * (cell + 2)))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _save_checkpoint(ckpt_dir: Path, model: VQModel, opt, step: int, disc=None, disc_opt=None,
                     train_config: dict | None = None, teacher: VQModel | None = None) -> None:
    with atomic_path(ckpt_dir) as tmp:
        model.save_pretrained(tmp)
        if teacher is not None:
            teacher.save_pretrained(tmp / "roundtrip_teacher")
        torch.save({
            "optimizer": opt.state_dict(),
            "disc": disc.state_dict() if disc is not None else None,
            "disc_optimizer": disc_opt.state_dict() if disc_opt is not None else None,
            "rng": torch.get_rng_state(),
            "unused_steps": model.quantize.unused_steps.cpu(),
        }, tmp / "train_state.pt")
        write_json(tmp / "state.json", {"step": step, "train_config": train_config})


def _load_teacher(ckpt_dir: Path, model: VQModel) -> VQModel:
    path = ckpt_dir / "roundtrip_teacher"
    if not (path / "model.safetensors").is_file():
        raise CM3LeonError(f"{ckpt_dir}: the checkpoint is inside the round-trip phase but has no "
                           f"{path.name}/; delete the checkpoint to start over")
    return VQModel.from_pretrained(path).to(next(model.parameters()).device).eval()


VQ_RESUME_MAY_CHANGE = ("steps", "roundtrip_steps", "log_every", "ckpt_every")  # the rest shape the run


def _load_checkpoint(ckpt_dir: Path, model: VQModel, opt, disc=None, disc_opt=None,
                     train_config: dict | None = None) -> int:
    """Restore a checkpoint; a damaged file, another model config, or another training config
    (outside VQ_RESUME_MAY_CHANGE), or more steps done than asked for, is a CM3LeonError."""
    saved = read_json(ckpt_dir / "config.json", "checkpoint config")
    current = model.config.to_dict()
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        raise CM3LeonError(f"{ckpt_dir}: the checkpoint was trained with a different config {diff}; "
                           "use another --out or delete the checkpoint to start over")
    state = read_json(ckpt_dir / "state.json", "checkpoint state")
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int):
        raise CM3LeonError(f"{ckpt_dir / 'state.json'}: no integer step")
    saved_tc = state.get("train_config")
    if train_config is not None and isinstance(saved_tc, dict):
        changed = {k: (saved_tc.get(k), train_config.get(k)) for k in sorted(set(saved_tc) | set(train_config))
                   if k not in VQ_RESUME_MAY_CHANGE and saved_tc.get(k) != train_config.get(k)}
        if changed:
            raise CM3LeonError(f"{ckpt_dir}: resuming with another training config {changed}; "
                               "use another --out or delete the checkpoint to start over")
        total = int(train_config.get("steps", 0)) + int(train_config.get("roundtrip_steps", 0))
        if total < step:
            raise CM3LeonError(f"{ckpt_dir}: the checkpoint has done {step} steps, more than the {total} asked for")
    model.load_state_dict(load_safetensors(ckpt_dir / "model.safetensors", "checkpoint weights"))
    try:
        st = torch.load(ckpt_dir / "train_state.pt", map_location="cpu", weights_only=True)
        opt.load_state_dict(st["optimizer"])
        if disc is not None and st.get("disc") is not None:
            disc.load_state_dict(st["disc"])
            disc_opt.load_state_dict(st["disc_optimizer"])
        torch.set_rng_state(st["rng"])
        model.quantize.unused_steps.copy_(st["unused_steps"])
    except FileNotFoundError:
        raise CM3LeonError(f"{ckpt_dir / 'train_state.pt'}: training state file missing") from None
    except Exception as e:  # noqa: BLE001 - garbage unpickles / indexes / loads in many ways
        raise CM3LeonError(f"{ckpt_dir / 'train_state.pt'}: training state truncated or corrupt "
                           f"({type(e).__name__}: {str(e)[:160]})") from None
    return step


# ---------------------------------------------------------------------------------------------


def train_image_tokenizer(data: str | Path, out: str | Path, preset: str = "demo32", steps: int | None = None,
                          batch_size: int | None = None, lr: float | None = None, seed: int = 0,
                          disc_start: int | None = None, lpips_weights: str | Path | None = None,
                          roundtrip_steps: int | None = None, roundtrip_decoder: bool | None = None,
                          config: VQConfig | None = None, train_config: VQTrainConfig | None = None,
                          max_train_images: int | None = None, device: str = "cpu", threads: int | None = None) -> dict:
    """Train a VQ image tokenizer on a dataset (any reader format) and save it in `out`.

    `out` then holds what `VQModel.from_pretrained(out)` loads, plus `metrics.json` (measured on
    the val/test split), `metrics.jsonl`, `reconstructions.png` and a resumable `checkpoint/`.
    Running again with the same `out` resumes from the checkpoint. Returns the metrics."""
    out = Path(out)
    cfg = config or get_preset(preset)
    tc = train_config or lookup(TRAIN_PRESETS, preset, "image tokenizer training")
    overrides = {k: v for k, v in (("steps", steps), ("batch_size", batch_size), ("lr", lr),
                                   ("disc_start", disc_start), ("roundtrip_steps", roundtrip_steps),
                                   ("roundtrip_decoder", roundtrip_decoder)) if v is not None}
    tc = replace(tc, **overrides)
    if tc.roundtrip_steps < 0 or tc.roundtrip_recon_weight < 0 or not 0 <= tc.roundtrip_warmup < 1:
        raise CM3LeonError("need roundtrip_steps >= 0, roundtrip_recon_weight >= 0 and 0 <= roundtrip_warmup < 1, got "
                           f"{tc.roundtrip_steps}, {tc.roundtrip_recon_weight}, {tc.roundtrip_warmup}")
    if tc.steps < 1 or tc.batch_size < 1 or tc.lr <= 0:
        raise CM3LeonError(f"steps, batch size and lr must be positive (got {tc.steps}, {tc.batch_size}, {tc.lr})")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)

    # --- data: the train split in memory; held-out = val, else test, else a slice of train
    train_u8, skipped = load_images(data, cfg.resolution, "train", limit=max_train_images)
    eval_u8, eval_split = torch.zeros(0), None
    for split in ("val", "test"):
        eval_u8, _ = load_images(data, cfg.resolution, split, limit=tc.eval_images)
        if eval_u8.shape[0]:
            eval_split = split
            break
    if train_u8.shape[0] == 0:
        raise CM3LeonError(f"{data}: no training images found (split 'train', skipped: {skipped})")
    if eval_split is None:
        n_hold = max(1, min(tc.eval_images, int(train_u8.shape[0] * tc.holdout_fraction)))
        if train_u8.shape[0] - n_hold < 1:
            raise CM3LeonError(f"{data}: too few images ({train_u8.shape[0]}) to hold some out for evaluation")
        eval_u8, train_u8, eval_split = train_u8[-n_hold:], train_u8[:-n_hold], "train-holdout"

    # --- model, optimisers, optional losses
    model = VQModel(cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=0.0)
    disc = disc_opt = None
    if tc.disc_start is not None:
        disc = PatchDiscriminator(cfg.in_channels, tc.disc_channels, tc.disc_layers).to(device)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=0.0)
    lpips = load_lpips(lpips_weights).to(device) if lpips_weights else None

    if cfg.architecture == "patch":  # no network to train: the codebook is a k-means fit
        t0 = time.time()
        fit = fit_patch_codebook(model, train_u8, tc.kmeans_iters, tc.kmeans_max_vectors, seed)
        return _save_and_measure(model, out, eval_u8, {
            "eval_split": eval_split, "preset": preset, "train_images": int(train_u8.shape[0]),
            "train_time_s": round(time.time() - t0, 1), "reader_skipped": skipped, **fit})

    ckpt_dir = out / CHECKPOINT_DIR
    for p in remove_stale_temporaries(out):  # what a kill during a checkpoint save left
        warnings.warn(f"cleaned up {p} (left by an interrupted checkpoint save)", stacklevel=2)
    start = 0
    if (ckpt_dir / "state.json").is_file():
        start = _load_checkpoint(ckpt_dir, model, opt, disc, disc_opt, _tc_dict(tc))
    elif tc.kmeans_init:
        with torch.no_grad():  # k-means codebook init from encoder outputs of the first batch
            x0 = _batch(train_u8, -1, min(tc.kmeans_images, train_u8.shape[0]), seed, False).to(device)
            model.quantize.kmeans_init_(model.latents(x0))

    use_bf16 = tc.bf16
    device_type = torch.device(device).type
    out.mkdir(parents=True, exist_ok=True)
    trim_metrics(out / "metrics.jsonl", start)  # steps after the checkpoint are trained again
    logger = MetricsLogger(out / "metrics.jsonl")
    t0 = time.time()
    done = start  # completed steps (what a checkpoint records)
    total = tc.steps + tc.roundtrip_steps
    teacher = None  # the model as the round-trip phase began: the source of its target codes
    rt_temperature = None
    rt_warmup = max(1, round(tc.roundtrip_warmup * tc.roundtrip_steps))  # steps of linear warmup
    anchor = (lambda r, x: tc.roundtrip_recon_weight * pixel_losses(r, x, *_pixel_weights(tc))[0]) if tc.roundtrip_decoder else None
    if start > tc.steps:
        teacher = _load_teacher(ckpt_dir, model)
    bar = progress(total=total, desc="image tokenizer", unit="step", initial=start)
    model.train()
    try:
        for step in range(start, total):
            x = _batch(train_u8, step, tc.batch_size, seed, tc.hflip).to(device)
            if step >= tc.steps:  # the round-trip phase: codebook frozen
                rt_step = step - tc.steps
                rt_lr = (tc.roundtrip_lr * min(1.0, (rt_step + 1) / rt_warmup)
                         * 0.5 * (1 + math.cos(math.pi * rt_step / tc.roundtrip_steps)))
                for group in opt.param_groups:
                    group["lr"] = rt_lr
                if teacher is None:  # the phase begins (a resumed phase loads its teacher and optimizer)
                    teacher = copy.deepcopy(model).eval()
                    # a new objective: fresh Adam moments (those of training would scale the first
                    # steps wrongly and throw the decoder off) and torch's default betas
                    opt.state.clear()
                    for group in opt.param_groups:
                        group["betas"] = (0.9, 0.999)
                if rt_temperature is None:  # the codebook is frozen in this phase: measure once
                    rt_temperature = tc.roundtrip_temperature * model.quantize.code_spacing()
                loss, kept = roundtrip_step(model, teacher, x, rt_temperature, anchor)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # never reaches the codebook; the decoder only with roundtrip_decoder
                if tc.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                opt.step()
                done = step + 1
                bar.update(1)
                if step % tc.log_every == 0 or step == total - 1:
                    logger.log(step=step + 1, roundtrip_loss=loss.item(), roundtrip_kept=round(kept, 4), lr=rt_lr)
                    bar.set_postfix(rt_loss=f"{loss.item():.4f}", kept=f"{kept:.3f}")
                if done % tc.ckpt_every == 0 and done < total:
                    _save_checkpoint(ckpt_dir, model, opt, done, disc, disc_opt, _tc_dict(tc), teacher)
                continue
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, tc)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_bf16):
                recon, qlosses, codes = model(x)
            recon = recon.float()
            nll, l1, l2 = pixel_losses(recon, x, *_pixel_weights(tc))
            if lpips is not None:
                nll = nll + tc.perceptual_weight * lpips(recon, x).mean()
            loss = nll + tc.codebook_weight * qlosses["quant"]
            gan_on = disc is not None and step >= tc.disc_start
            g_loss = d_weight = None
            if gan_on:
                g_loss = -disc(recon).mean()  # hinge generator loss
                d_weight = adaptive_weight(nll, g_loss, model.decoder.last_layer, tc.disc_weight)
                loss = loss + d_weight * g_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            opt.step()
            d_loss = None
            if gan_on:
                for group in disc_opt.param_groups:
                    group["lr"] = _lr_at(step, tc)
                d_loss = (F.relu(1 - disc(x)).mean() + F.relu(1 + disc(recon.detach())).mean())
                disc_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                disc_opt.step()
            done = step + 1

            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps - 1:
                mse = ((recon.detach() - x) ** 2).mean().item()  # unweighted, for PSNR
                psnr = 10 * math.log10(4.0 / max(mse, 1e-10))  # pixels in [-1, 1]: peak-to-peak 2
                used = codes.unique().numel()
                row = {"step": step + 1, "loss": loss.item(), "l1": l1.item(), "l2": l2.item(),
                       "commitment": qlosses["commitment"].item(), "train_psnr_db": round(psnr, 2),
                       "batch_codes_used": used, "lr": _lr_at(step, tc)}
                if gan_on:
                    row.update(g_loss=g_loss.item(), d_loss=d_loss.item(), d_weight=float(d_weight))
                logger.log(**row)
                bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}", codes=used)
            if done % tc.ckpt_every == 0 and done < total:
                _save_checkpoint(ckpt_dir, model, opt, done, disc, disc_opt, _tc_dict(tc))
    except KeyboardInterrupt:
        # keep the work done so far: the next run resumes from here
        _save_checkpoint(ckpt_dir, model, opt, done, disc, disc_opt, _tc_dict(tc), teacher)
        raise
    finally:
        bar.close()
        logger.close()
    train_time = time.time() - t0
    if start < total:
        _save_checkpoint(ckpt_dir, model, opt, total, disc, disc_opt, _tc_dict(tc), teacher)

    return _save_and_measure(model, out, eval_u8, {
        "eval_split": eval_split, "preset": preset, "steps": tc.steps, "roundtrip_steps": tc.roundtrip_steps, "steps_this_run": total - start,
        "batch_size": tc.batch_size, "train_images": int(train_u8.shape[0]), "train_time_s": round(train_time, 1),
        "images_per_s": round((total - start) * tc.batch_size / max(train_time, 1e-9), 1),
        "lpips": lpips is not None, "gan": disc is not None, "reader_skipped": skipped})


def _save_and_measure(model: VQModel, out: Path, eval_u8: torch.Tensor, info: dict) -> dict:
    """Write the tokenizer directory, measure it on the held-out images and write metrics.json."""
    cfg = model.config
    model.eval()
    model.save_pretrained(out)
    metrics, recons_u8 = evaluate(model, eval_u8)
    metrics.update({
        **info, "tokens_per_image": cfg.tokens_per_image, "grid": list(cfg.grid), "codebook_size": cfg.codebook_size,
        "architecture": cfg.architecture, "parameters": model.num_parameters,
        # codes kept by encode -> decode -> encode on held-out images (re-tokenizing generated pictures)
        "roundtrip_code_agreement": round(code_stability(model, eval_u8), 4),
    })
    checker = checker_recovery(eval_u8[:200], recons_u8[:200])
    if checker is not None:
        metrics.update(checker)
    save_reconstruction_grid(out / "reconstructions.png", eval_u8, recons_u8)
    write_json(out / "metrics.json", metrics)
    return metrics


@torch.no_grad()
def fit_patch_codebook(model: VQModel, images_u8: torch.Tensor, iters: int, max_vectors: int, seed: int,
                       batch_size: int = 512) -> dict:
    """Fit a patch tokenizer's codebook (VQConfig.architecture="patch") by k-means on the
    distinct patches of the training images. Exact duplicates count once, so a flat background
    repeated millions of times gets one code rather than most of them. With no more distinct
    patches than codes, every patch gets its own code (lossless); else at most `max_vectors` of
    them, drawn at random, are clustered (k-means++ seeding, `iters` Lloyd steps)."""
    dim = model.config.embed_dim
    distinct = []
    for i in range(0, images_u8.shape[0], batch_size):
        z = model.latents(_to_float(images_u8[i:i + batch_size]))  # (B, D, h, w)
        distinct.append(torch.unique(z.permute(0, 2, 3, 1).reshape(-1, dim), dim=0))
    patches = torch.unique(torch.cat(distinct), dim=0)  # (N, D), sorted: deterministic
    num_distinct = patches.shape[0]
    g = torch.Generator().manual_seed(seed)
    if num_distinct > max_vectors:
        patches = patches[torch.randperm(num_distinct, generator=g)[:max_vectors]]
    k = model.config.codebook_size
    if patches.shape[0] <= k:  # unused codes repeat the first patch; nearest() picks the lowest index
        model.quantize.embedding.weight.copy_(torch.cat([patches, patches[:1].expand(k - patches.shape[0], -1)]))
    else:
        torch.manual_seed(seed)
        model.quantize.kmeans_init_(patches, iters=iters)
    return {"distinct_patches": int(num_distinct), "kmeans_vectors": int(patches.shape[0]),
            "lossless": bool(num_distinct <= k)}


def _tc_dict(tc: VQTrainConfig) -> dict:
    d = asdict(tc)
    d["betas"] = list(tc.betas)
    return d
