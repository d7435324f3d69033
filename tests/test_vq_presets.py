"""The paper's image tokenizer preset (256 px -> 32x32 = 1,024 codes from 8,192, CM3Leon Sec. 2.1)
and the encode -> decode -> encode code-stability measurement."""

import json

import pytest
import torch
from PIL import Image
from torch import nn

from cm3leon.errors import CM3LeonError
from cm3leon.tokenizers.image import VQModel, get_preset
from cm3leon.tokenizers.image_metrics import code_stability


def test_cm3leon_preset_full_width_maps_256px_to_32x32_latents_and_back_on_meta():
    # the real widths, built on `meta`: shapes propagate without allocating or computing
    with torch.device("meta"):
        vq = VQModel(get_preset("cm3leon"))
    cfg = vq.config
    assert (cfg.resolution, cfg.grid, cfg.tokens_per_image, cfg.codebook_size) == (256, (32, 32), 1024, 8192)
    assert tuple(vq.quantize.embedding.weight.shape) == (8192, cfg.embed_dim)
    z = vq.quant_conv(vq.encoder(torch.empty(2, 3, 256, 256, device="meta")))
    assert tuple(z.shape) == (2, cfg.embed_dim, 32, 32)
    z_q = vq.quantize.lookup(torch.zeros(2, 32, 32, dtype=torch.long, device="meta"))
    assert tuple(vq.decode_latents(z_q).shape) == (2, 3, 256, 256)


def test_cm3leon_preset_reduced_width_encodes_256px_to_1024_codes_in_range_and_decodes_back():
    # The full-width 256-px forward takes seconds on a CPU; the same preset with narrow
    # channels keeps every level, the 32x32 attention and the 8,192-entry codebook.
    torch.manual_seed(0)
    vq = VQModel(get_preset("cm3leon", base_channels=8, z_channels=16, embed_dim=16, norm_groups=4)).eval()
    images = torch.rand(2, 3, 256, 256) * 2 - 1
    codes = vq.encode(images)
    assert codes.dtype == torch.long and tuple(codes.shape) == (2, 32, 32)
    assert codes[0].numel() == 1024
    assert 0 <= codes.min().item() and codes.max().item() < 8192
    assert codes.unique().numel() > 50  # a real nearest-neighbour search, not a constant
    out = vq.decode(codes.reshape(2, 1024))  # flat code rows, as the language model emits them
    assert tuple(out.shape) == (2, 3, 256, 256)
    assert out.min().item() >= -1 and out.max().item() <= 1


class _GridVQ(nn.Module):
    """A 16-px "tokenizer" with 4x4 binary codes whose decoder inverts column 0 of the grid, so
    exactly 4 of 16 codes change on a round trip."""

    def __init__(self):
        super().__init__()
        self.config = get_preset("tiny")

    def encode(self, x):
        assert not self.training
        return (x[:, 0, ::4, ::4] > 0).long()  # (B, 4, 4)

    def decode(self, codes):
        flipped = codes.clone()
        flipped[:, :, 0] = 1 - flipped[:, :, 0]
        img = (flipped.float() * 2 - 1).repeat_interleave(4, 1).repeat_interleave(4, 2)  # (B, 16, 16)
        return img[:, None].expand(-1, 3, -1, -1) * 0.9


def test_code_stability_counts_codes_unchanged_by_a_round_trip_in_any_batching():
    vq = _GridVQ().train()
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    assert code_stability(vq, x) == pytest.approx(0.75)
    assert code_stability(vq, x, batch_size=2) == pytest.approx(0.75)
    x_u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    assert code_stability(vq, x_u8) == pytest.approx(0.75)
    pil = [Image.fromarray(a) for a in x_u8.permute(0, 2, 3, 1).numpy()]
    assert code_stability(vq, pil) == pytest.approx(0.75)
    assert vq.training  # the caller's mode is restored


def test_code_stability_of_a_real_tokenizer_matches_a_hand_computed_round_trip():
    torch.manual_seed(0)
    vq = VQModel(get_preset("tiny")).eval()
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    c1 = vq.encode(x)
    c2 = vq.encode(vq.decode(c1))
    expected = (c1 == c2).float().mean().item()
    assert code_stability(vq, x, round_pixels=False, batch_size=4) == pytest.approx(expected)
    assert 0.0 <= code_stability(vq, x) <= 1.0


def test_code_stability_bad_inputs_raise_clear_errors():
    vq = VQModel(get_preset("tiny")).eval()
    with pytest.raises(CM3LeonError, match="no images"):
        code_stability(vq, torch.zeros(0, 3, 16, 16))
    with pytest.raises(CM3LeonError, match=r"\[B, C, H, W\]"):
        code_stability(vq, torch.zeros(3, 16, 16))
    with pytest.raises(CM3LeonError, match="batch_size"):
        code_stability(vq, torch.zeros(1, 3, 16, 16), batch_size=0)
    with pytest.raises(CM3LeonError, match="expects 16x16"):
        code_stability(vq, torch.zeros(1, 3, 32, 32))


def test_training_records_roundtrip_code_agreement_on_held_out_images(tmp_path):
    from cm3leon.tokenizers.image_train import load_images, train_image_tokenizer

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    with open(data / "captions.jsonl", "w") as f:
        for i in range(12):
            px = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(data / "images" / f"{i}.png")
            split = "val" if i >= 9 else "train"
            f.write(json.dumps({"image": f"images/{i}.png", "text": "noise", "split": split}) + "\n")
    metrics = train_image_tokenizer(data, tmp_path / "vq", preset="tiny", steps=2, batch_size=4, seed=0)
    held_out, _ = load_images(data, 16, "val")
    vq = VQModel.from_pretrained(tmp_path / "vq")
    assert metrics["roundtrip_code_agreement"] == pytest.approx(code_stability(vq, held_out), abs=1e-4)
    saved = json.loads((tmp_path / "vq" / "metrics.json").read_text())
    assert saved["roundtrip_code_agreement"] == metrics["roundtrip_code_agreement"]
