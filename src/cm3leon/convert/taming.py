"""Taming-transformers VQGAN checkpoints (Esser et al. 2021) into `VQModel`: Chameleon's
released `vqgan.ckpt` / `vqgan.yaml` and any taming VQGAN with the plain quantizer.

    from cm3leon.convert.taming import load_taming_vqgan
    vq = load_taming_vqgan("vqgan.ckpt", "vqgan.yaml")
    vq.save_pretrained("chameleon_vq")     # then a cm3leon image tokenizer directory
"""

from __future__ import annotations

from pathlib import Path

import torch

from cm3leon.errors import CM3LeonError
from cm3leon.tokenizers.image import VQConfig, VQModel, load_weights

TAMING_PREFIXES = ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")


def load_taming_vqgan(ckpt_path: str | Path, yaml_path: str | Path, trust_checkpoint: bool = False,
                      device: str | torch.device = "cpu") -> VQModel:
    """Load a taming-transformers VQGAN (`.ckpt` + its `.yaml`), e.g. Chameleon's released
    `vqgan.ckpt` / `vqgan.yaml`.

    The checkpoint is read with `torch.load(weights_only=True)`. Lightning checkpoints hold
    Python objects besides the weights and then need `trust_checkpoint=True`, which runs
    the pickle: only do that for a file from a source you trust."""
    cfg = config_from_taming_yaml(yaml_path)
    state = read_taming_state(Path(ckpt_path), trust_checkpoint)
    model = VQModel(cfg)
    keep = {k: v for k, v in state.items() if k.split(".")[0] in TAMING_PREFIXES}
    if not keep:
        raise CM3LeonError(f"{ckpt_path}: no VQGAN weights found (expected keys like "
                           f"'encoder.conv_in.weight'; found e.g. {sorted(state)[:5]})")
    load_weights(model, keep, str(ckpt_path))
    return model.to(device).eval()


def config_from_taming_yaml(yaml_path: str | Path) -> VQConfig:
    """VQConfig from a taming VQGAN yaml (`model.params.{embed_dim, n_embed, ddconfig}`)."""
    import yaml

    yaml_path = Path(yaml_path)
    if not yaml_path.is_file():
        raise FileNotFoundError(f"taming config not found: {yaml_path}")
    try:
        doc = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CM3LeonError(f"{yaml_path}: not valid YAML ({e})") from None
    params = doc.get("model", doc) if isinstance(doc, dict) else None
    params = params.get("params", params) if isinstance(params, dict) else None
    if not isinstance(params, dict) or "ddconfig" not in params:
        raise CM3LeonError(f"{yaml_path}: expected a taming VQGAN config with model.params.ddconfig")
    dd = params["ddconfig"]
    target = str(doc.get("model", {}).get("target", "")) if isinstance(doc.get("model"), dict) else ""
    if "Gumbel" in target or "EMA" in target:
        raise CM3LeonError(f"{yaml_path}: {target} is not supported (only the plain VQModel quantizer)")
    if dd.get("double_z"):
        raise CM3LeonError(f"{yaml_path}: ddconfig.double_z=true is not a VQGAN encoder")
    if int(dd.get("out_ch", dd.get("in_channels", 3))) != int(dd.get("in_channels", 3)):
        raise CM3LeonError(f"{yaml_path}: out_ch must equal in_channels")
    try:
        return VQConfig(
            resolution=int(dd["resolution"]), in_channels=int(dd.get("in_channels", 3)),
            base_channels=int(dd["ch"]), channel_multipliers=tuple(dd["ch_mult"]),
            num_res_blocks=int(dd["num_res_blocks"]), attn_resolutions=tuple(dd.get("attn_resolutions") or ()),
            z_channels=int(dd["z_channels"]), embed_dim=int(params["embed_dim"]),
            codebook_size=int(params["n_embed"]), beta=float(params.get("beta", 0.25)),
            codebook_type="nearest", dropout=float(dd.get("dropout", 0.0)), norm_groups=32,
        )
    except KeyError as e:
        raise CM3LeonError(f"{yaml_path}: missing field {e.args[0]!r}") from None


def read_taming_state(ckpt_path: Path, trust_checkpoint: bool) -> dict:
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"taming checkpoint not found: {ckpt_path}")
    if ckpt_path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(ckpt_path))
    try:
        obj = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # an UnpicklingError for Lightning objects, or a corrupt file
        if not trust_checkpoint:
            raise CM3LeonError(
                f"{ckpt_path}: cannot be read as plain weights ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                "Taming/Lightning .ckpt files also pickle Python objects (callbacks, hyper-parameters), and "
                "unpickling runs code, so it is off by default. If you trust where the file came from, pass "
                "trust_checkpoint=True (CLI: --trust-checkpoint).") from None
        try:
            obj = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise CM3LeonError(f"{ckpt_path}: not a readable PyTorch checkpoint ({type(e2).__name__}: {e2})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CM3LeonError(f"{ckpt_path}: expected a state dict (or a dict with 'state_dict') of tensors")
    return state
