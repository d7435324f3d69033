"""Bi-encoder retriever: text and images embedded into one space, after CLIP (Radford et al.
2021, "Learning Transferable Visual Models From Natural Language Supervision",
arXiv:2103.00020), which CM3Leon uses frozen (ViT-B/32) to score memory-bank documents
(CM3Leon Sec. 2.2).

Two backends behind one interface, `Retriever`:
- `bi-encoder`: a small model trained from scratch here (`cm3leon retriever train`): a byte-level
  transformer for text (no tokenizer needed) and a small CNN for pixels;
- `clip`: real CLIP weights from a local Hugging Face directory (`cm3leon retriever clip
  --clip-dir DIR --out DIR`), loaded with `transformers.CLIPModel.from_pretrained(dir)`; nothing
  is downloaded. Image preprocessing (resize, centre crop, normalise) is done here with PIL and
  numpy, so torchvision is not needed.

A retriever directory holds `config.json` (`{"format", "kind", ...}`) and the weights;
`load_retriever(dir)` opens either kind.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cm3leon.errors import CM3LeonError, require
from cm3leon.utils.io import atomic_path, load_safetensors, read_json, write_json

FORMAT = "cm3leon-retriever/1"
BYTE_PAD = 256  # byte ids are 0..255; 256 pads


@dataclass
class BiEncoderConfig:
    image_size: int = 32  # pixels; images are resized to image_size x image_size
    embed_dim: int = 64  # dimension of the shared text/image space
    text_max_bytes: int = 128  # captions are truncated to this many UTF-8 bytes
    text_bytes_per_token: int = 4  # consecutive bytes merged into one transformer token (4x shorter sequences)
    text_width: int = 96  # byte-transformer width
    text_layers: int = 2
    text_heads: int = 4
    image_channels: tuple[int, ...] = (32, 64, 128)  # one stride-2 conv stage each
    image_pool: int = 4  # feature map pooled to pool x pool and flattened: keeps the layout ("above", "left of")
    init_temperature: float = 0.07  # CLIP's initial softmax temperature (learned)
    max_logit_scale: float = 100.0  # CLIP clamps the learned logit scale at 100

    @classmethod
    def from_dict(cls, d: dict) -> "BiEncoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CM3LeonError(f"retriever config: unknown fields {sorted(unknown)}")
        d = dict(d)
        if "image_channels" in d:
            d["image_channels"] = tuple(d["image_channels"])
        return cls(**d)


# ---------------------------------------------------------------------------- inputs

def encode_bytes(texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes of each text, truncated to max_len and padded: (ids [N, L], mask [N, L])."""
    rows = [list(t.encode("utf-8")[:max_len]) or [ord(" ")] for t in texts]
    length = max(len(r) for r in rows) if rows else 1
    ids = torch.full((len(rows), length), BYTE_PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, ids != BYTE_PAD


def images_to_uint8(images: Sequence, size: int) -> torch.Tensor:
    """PIL images -> uint8 tensor [N, 3, size, size] (RGB; resized when not already size x size)."""
    from PIL import Image

    arrs = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        arrs.append(np.asarray(im, dtype=np.uint8))
    if not arrs:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


# ---------------------------------------------------------------------------- model

class ByteTextEncoder(nn.Module):
    """Bytes -> patches of `text_bytes_per_token` bytes -> pre-LN transformer -> masked mean
    pool -> projection. Patching keeps byte-level input (no tokenizer) at a fraction of the cost."""

    def __init__(self, cfg: BiEncoderConfig):
        super().__init__()
        self.patch = cfg.text_bytes_per_token
        self.tok = nn.Embedding(BYTE_PAD + 1, cfg.text_width)
        self.merge = nn.Linear(self.patch * cfg.text_width, cfg.text_width)
        self.pos = nn.Parameter(torch.randn(-(-cfg.text_max_bytes // self.patch), cfg.text_width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.text_width, cfg.text_heads, 4 * cfg.text_width, dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_width)
        self.proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)

    def token_states(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token states after the final LayerNorm, (states [N, T, W], mask [N, T]), T = L / p."""
        n, length = ids.shape
        pad = -length % self.patch
        if pad:
            ids = F.pad(ids, (0, pad), value=BYTE_PAD)
            mask = F.pad(mask, (0, pad), value=False)
        x = self.tok(ids).reshape(n, -1, self.patch * self.tok.embedding_dim)  # (N, L/p, p*W)
        mask = mask.reshape(n, -1, self.patch).any(-1)  # (N, L/p): a patch with any real byte
        x = self.merge(x) + self.pos[: x.shape[1]]  # (N, T, W)
        return self.norm(self.blocks(x, src_key_padding_mask=~mask)), mask

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x, mask = self.token_states(ids, mask)
        m = mask.unsqueeze(-1).to(x.dtype)
        x = (x * m).sum(1) / m.sum(1).clamp_min(1.0)  # (N, W)
        return self.proj(x)


class PixelImageEncoder(nn.Module):
    """Pixels -> stride-2 conv stages -> pool to a small grid -> flatten -> projection."""

    def __init__(self, cfg: BiEncoderConfig):
        super().__init__()
        layers, c_in = [], 3
        for c in cfg.image_channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(1, c), nn.GELU()]
            c_in = c
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(cfg.image_pool)
        self.proj = nn.Linear(c_in * cfg.image_pool ** 2, cfg.embed_dim, bias=False)

    def forward(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        x = pixels_uint8.float() / 127.5 - 1.0  # (N, 3, H, W) in [-1, 1]
        x = self.pool(self.convs(x))  # (N, C, p, p)
        return self.proj(x.flatten(1))


class BiEncoder(nn.Module):
    """Text and image towers with a learned temperature (CLIP)."""

    def __init__(self, cfg: BiEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.text = ByteTextEncoder(cfg)
        self.image = PixelImageEncoder(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(ids, mask), dim=-1)

    def encode_image(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(pixels_uint8), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)


# ---------------------------------------------------------------------------- the interface

class Retriever:
    """Embeds texts, images and documents into one space; every vector is l2-normalised.

    `embed_documents` is the paper's document vector: the normalised mean of the normalised
    text and image embeddings (CM3Leon Sec. 2.2)."""

    kind: str
    dim: int
    image_size: int
    path: Path | None = None
    device: torch.device

    def _text(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def _image(self, images: list) -> torch.Tensor:
        raise NotImplementedError

    def _text_tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def text_width(self) -> int:
        """Width of the text encoder's per-token states (`embed_text_tokens`)."""
        raise NotImplementedError

    @torch.no_grad()
    def embed_text_tokens(self, texts: Sequence[str], max_tokens: int, batch_size: int = 256
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The text encoder's last per-token states, the text conditioning of a latent-diffusion
        model (Stable Diffusion cross-attends to CLIP's the same way): (states [N, max_tokens,
        text_width] float32 on CPU, zero where padded; mask [N, max_tokens], True on real tokens).
        Longer texts keep their first max_tokens states."""
        texts = list(texts)
        states = torch.zeros(len(texts), max_tokens, self.text_width)
        mask = torch.zeros(len(texts), max_tokens, dtype=torch.bool)
        for i in range(0, len(texts), batch_size):
            s, m = self._text_tokens(texts[i:i + batch_size])
            t = min(max_tokens, s.shape[1])
            states[i:i + s.shape[0], :t] = (s[:, :t] * m[:, :t, None]).float().cpu()
            mask[i:i + s.shape[0], :t] = m[:, :t].cpu()
        return states, mask

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """[N, D] float32 on CPU, unit norm."""
        texts = list(texts)
        outs = [self._text(texts[i:i + batch_size]).float().cpu() for i in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(outs), dim=-1) if outs else torch.zeros(0, self.dim)

    @torch.no_grad()
    def embed_image(self, images: Sequence, batch_size: int = 256) -> torch.Tensor:
        """[N, D] float32 on CPU, unit norm."""
        images = list(images)
        outs = [self._image(images[i:i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)]
        return F.normalize(torch.cat(outs), dim=-1) if outs else torch.zeros(0, self.dim)

    def embed_documents(self, texts: Sequence[str], images: Sequence) -> torch.Tensor:
        """Document vectors [N, D]: normalise(mean(text_emb, image_emb))."""
        if len(texts) != len(images):
            raise CM3LeonError(f"embed_documents: {len(texts)} texts but {len(images)} images")
        return F.normalize(self.embed_text(texts) + self.embed_image(images), dim=-1)

    def clip_score(self, images: Sequence, texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of each image with its text, [N] (best-of-N re-ranking, CLIP score)."""
        if len(texts) != len(images):
            raise CM3LeonError(f"clip_score: {len(images)} images but {len(texts)} texts")
        return (self.embed_image(images) * self.embed_text(texts)).sum(-1)


class BiEncoderRetriever(Retriever):
    kind = "bi-encoder"

    def __init__(self, model: BiEncoder, path: Path | None = None, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.dim = model.cfg.embed_dim
        self.image_size = model.cfg.image_size
        self.path = path

    def _text(self, texts):
        ids, mask = encode_bytes(texts, self.model.cfg.text_max_bytes)
        return self.model.encode_text(ids.to(self.device), mask.to(self.device))

    def _image(self, images):
        return self.model.encode_image(images_to_uint8(images, self.image_size).to(self.device))

    def _text_tokens(self, texts):
        ids, mask = encode_bytes(texts, self.model.cfg.text_max_bytes)
        return self.model.text.token_states(ids.to(self.device), mask.to(self.device))

    @property
    def text_width(self) -> int:
        return self.model.cfg.text_width


# OpenAI CLIP's normalisation, used when the directory has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPRetriever(Retriever):
    """`transformers.CLIPModel` + its tokenizer, loaded from a local directory only."""

    kind = "clip"

    def __init__(self, model_dir: str | Path, path: Path | None = None, device: str | torch.device = "cpu"):
        transformers = require("transformers", "dev", "a CLIP-backed retriever")
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise CM3LeonError(f"{model_dir}: not a Hugging Face CLIP directory (no config.json)")
        try:
            self.model = transformers.CLIPModel.from_pretrained(str(model_dir), local_files_only=True)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError) as e:
            raise CM3LeonError(f"{model_dir}: cannot load a CLIP model and tokenizer from it ({e})") from None
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.model_dir = model_dir
        self.path = path
        self.dim = int(self.model.config.projection_dim)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_text_len = int(self.model.config.text_config.max_position_embeddings)
        pp = model_dir / "preprocessor_config.json"
        pre = read_json(pp) if pp.is_file() else {}
        self.mean = np.asarray(pre.get("image_mean", CLIP_MEAN), dtype=np.float32)
        self.std = np.asarray(pre.get("image_std", CLIP_STD), dtype=np.float32)

    def _text_model(self, texts):
        """(CLIP text-model output, attention mask [N, L] on the device)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_text_len,
                             return_tensors="pt")
        mask = enc["attention_mask"].to(self.device)
        return self.model.text_model(input_ids=enc["input_ids"].to(self.device), attention_mask=mask), mask

    def _text(self, texts):
        return self.model.text_projection(self._text_model(texts)[0].pooler_output)

    def _text_tokens(self, texts):
        out, mask = self._text_model(texts)
        return out.last_hidden_state, mask.bool()

    @property
    def text_width(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    def _image(self, images):
        pixels = torch.from_numpy(np.stack([self._preprocess(im) for im in images])).to(self.device)
        out = self.model.vision_model(pixel_values=pixels)
        return self.model.visual_projection(out.pooler_output)

    def _preprocess(self, im) -> np.ndarray:
        """CLIP preprocessing: shortest side -> image_size (bicubic), centre crop, normalise."""
        from PIL import Image

        im = im.convert("RGB")
        s = self.image_size
        w, h = im.size
        scale = s / min(w, h)
        im = im.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
        x = np.asarray(im, dtype=np.float32) / 255.0
        return ((x - self.mean) / self.std).transpose(2, 0, 1)  # (3, s, s)


# ---------------------------------------------------------------------------- files

def save_bi_encoder(model: BiEncoder, out: str | Path, extra: dict | None = None) -> None:
    """Write model.safetensors then config.json (config last: a directory with a config is complete)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json(out / "config.json", {"format": FORMAT, "kind": "bi-encoder", "config": asdict(model.cfg), **(extra or {})})


def make_clip_retriever(clip_dir: str | Path, out: str | Path, copy: bool = True) -> dict:
    """Make a retriever directory backed by local Hugging Face CLIP weights (paper: ViT-B/32).

    With `copy` the model and tokenizer are saved into `out/clip/` so the retriever directory
    stands alone (e.g. inside a model directory); otherwise `config.json` points at `clip_dir`.
    Usage: `cm3leon retriever clip --clip-dir /path/to/clip-vit-base-patch32 --out runs/retriever`,
    where the directory is what `CLIPModel.save_pretrained` / a hub snapshot contains
    (config.json, weights, tokenizer files)."""
    clip_dir = Path(clip_dir).resolve()
    r = CLIPRetriever(clip_dir)  # validates the directory before anything is written
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if copy:
            r.model.save_pretrained(str(tmp / "clip"))
            r.tokenizer.save_pretrained(str(tmp / "clip"))
            pp = clip_dir / "preprocessor_config.json"
            if pp.is_file():
                (tmp / "clip" / "preprocessor_config.json").write_bytes(pp.read_bytes())
            location = "clip"
        else:
            location = str(clip_dir)
        info = {"format": FORMAT, "kind": "clip", "clip_dir": location, "source": str(clip_dir),
                "dim": r.dim, "image_size": r.image_size}
        write_json(tmp / "config.json", info)
    return info


def load_retriever(path: str | Path, device: str | torch.device | None = None) -> Retriever:
    """Open a retriever directory of either kind (bi-encoder trained here, or local CLIP)."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CM3LeonError(f"{cfg_path}: missing; {path} is not a retriever directory "
                           "(make one with `cm3leon retriever train` or `cm3leon retriever clip`)")
    info = read_json(cfg_path, "retriever config")
    if info.get("format") != FORMAT:
        raise CM3LeonError(f"{cfg_path}: format {info.get('format')!r}, expected {FORMAT!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = info.get("kind")
    if kind == "bi-encoder":
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise CM3LeonError(f"{weights}: missing retriever weights")
        model = BiEncoder(BiEncoderConfig.from_dict(info["config"]))
        try:
            model.load_state_dict(load_safetensors(weights, "retriever weights"))
        except RuntimeError as e:
            raise CM3LeonError(f"{weights}: retriever weights do not fit {cfg_path} ({str(e)[:200]})") from None
        return BiEncoderRetriever(model, path=path, device=device)
    if kind == "clip":
        clip_dir = Path(info["clip_dir"])
        return CLIPRetriever(clip_dir if clip_dir.is_absolute() else path / clip_dir, path=path, device=device)
    raise CM3LeonError(f"{cfg_path}: unknown retriever kind {kind!r} (expected 'bi-encoder' or 'clip')")
