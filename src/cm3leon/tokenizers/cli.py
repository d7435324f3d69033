"""`cm3leon tokenizer text | image` and `cm3leon tokenize`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train the text (BPE) or image (VQ) tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="KIND")
    tsub.required = True

    t = tsub.add_parser("text", help="train a byte-level BPE on a dataset's captions and instruction-tuning texts")
    t.add_argument("--data", required=True, help="dataset (any reader format)")
    t.add_argument("--out", required=True, help="output folder (tokenizer.json)")
    t.add_argument("--vocab-size", default="small",
                   help="number of BPE tokens, or a preset: small (1024, default), tiny (512), paper (56320)")
    t.add_argument("--split", default="train", help="split whose captions train the BPE (default train)")
    t.add_argument("--captions-only", action="store_true",
                   help="leave out the dataset's VQA / edit / layout texts (by default the BPE learns them too)")
    t.set_defaults(func=_text)

    i = tsub.add_parser("image", help="train the VQ image tokenizer, or convert a taming VQGAN checkpoint",
                        description="Train a VQ image tokenizer on a dataset (--data), or convert a taming "
                                    "VQGAN checkpoint such as Chameleon's vqgan.ckpt (--from-taming + --yaml). "
                                    "Either way --out becomes a directory VQModel.from_pretrained loads.")
    i.add_argument("--out", required=True, help="output folder (config.json, model.safetensors, metrics.json, ...)")
    i.add_argument("--data", help="dataset to train on (any reader format)")
    i.add_argument("--preset", default="demo32",
                   help="model + training preset: demo32 (default), demo64, patch48 (k-means patch codes, seconds), tiny, cm3leon, chameleon")
    i.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    i.add_argument("--batch-size", type=int, default=None, help="images per step (default: the preset's)")
    i.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    i.add_argument("--seed", type=int, default=0, help="random seed")
    i.add_argument("--disc-start", type=int, default=None,
                   help="step at which the PatchGAN discriminator loss starts (default: the preset's; off on CPU presets)")
    i.add_argument("--roundtrip-steps", type=int, default=None,
                   help="steps after training that teach the encoder and decoder (codebook frozen) to make "
                        "decoded images re-encode to their own codes (default: the preset's; 0 = off)")
    i.add_argument("--roundtrip-decoder", action=argparse.BooleanOptionalAction, default=None,
                   help="whether the decoder learns in the round-trip phase too (default: the preset's); needed "
                        "to go past ~80%% of codes kept, with a phase of ~1,000+ steps")
    i.add_argument("--lpips-weights", default=None,
                   help="local LPIPS/VGG16 weights file enabling the perceptual loss (nothing is downloaded)")
    i.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    i.add_argument("--device", default="cpu", help="torch device (default cpu)")
    i.add_argument("--from-taming", metavar="CKPT", default=None,
                   help="convert this taming VQGAN .ckpt instead of training (needs --yaml)")
    i.add_argument("--yaml", default=None, help="the taming config (.yaml) of --from-taming")
    i.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling Python objects in --from-taming (only for files from a trusted source)")
    i.set_defaults(func=_image)

    k = sub.add_parser("tokenize", help="encode a dataset once into code shards (text BPE ids + image VQ codes)",
                       description="Encode a dataset once into code shards. Input shards (a webdataset's .tar "
                                   "files) are tokenized independently, by --workers processes or torchrun ranks "
                                   "(torchrun --nproc_per_node=N -m cm3leon.cli tokenize ...); an interrupted run "
                                   "resumes where it stopped.")
    k.add_argument("--data", required=True, help="dataset (any reader format)")
    k.add_argument("--image-tokenizer", required=True, help="folder written by `cm3leon tokenizer image`")
    k.add_argument("--text-tokenizer", required=True, help="folder written by `cm3leon tokenizer text`")
    k.add_argument("--out", required=True, help="output folder for the code shards (resumes if interrupted)")
    k.add_argument("--batch-size", type=int, default=64, help="images encoded per batch (default 64)")
    k.add_argument("--shard-size", type=int, default=4096, help="records per shard (default 4096)")
    k.add_argument("--images", default=None, help="image folder (COCO layout only)")
    k.add_argument("--device", default="cpu", help="torch device (default cpu)")
    k.add_argument("--workers", type=int, default=1,
                   help="processes, each taking whole input shards (default 1; the output does not depend "
                        "on it). Under torchrun each rank is one worker")
    k.set_defaults(func=_tokenize)


def _text(args) -> int:
    from cm3leon.sft.data import instruction_texts
    from cm3leon.tokenizers.text import train_text_tokenizer

    extra = [] if args.captions_only else instruction_texts(args.data, split=args.split)
    info = train_text_tokenizer(args.data, args.out, vocab_size=args.vocab_size, split=args.split, extra_texts=extra)
    print(json.dumps(info, indent=2))
    return 0


def _image(args) -> int:
    from cm3leon.errors import CM3LeonError

    if args.from_taming:
        from cm3leon.convert.taming import load_taming_vqgan

        if not args.yaml:
            raise CM3LeonError("--from-taming needs --yaml (the checkpoint's taming config)")
        model = load_taming_vqgan(args.from_taming, args.yaml, trust_checkpoint=args.trust_checkpoint)
        model.save_pretrained(args.out)
        cfg = model.config
        print(json.dumps({"out": str(Path(args.out)), "resolution": cfg.resolution, "grid": list(cfg.grid),
                          "codebook_size": cfg.codebook_size, "parameters": model.num_parameters}, indent=2))
        return 0
    if not args.data:
        raise CM3LeonError("give --data DIR to train, or --from-taming CKPT --yaml YAML to convert")
    from cm3leon.tokenizers.image_train import train_image_tokenizer

    metrics = train_image_tokenizer(args.data, args.out, preset=args.preset, steps=args.steps,
                                    batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                    disc_start=args.disc_start, lpips_weights=args.lpips_weights,
                                    roundtrip_steps=args.roundtrip_steps,
                                    roundtrip_decoder=args.roundtrip_decoder, device=args.device, threads=args.threads)
    print(json.dumps(metrics, indent=2))
    return 0


def _tokenize(args) -> int:
    from cm3leon.tokenizers.tokenize import tokenize_dataset

    meta = tokenize_dataset(args.data, args.image_tokenizer, args.text_tokenizer, args.out,
                            batch_size=args.batch_size, shard_size=args.shard_size, images=args.images,
                            device=args.device, workers=args.workers)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(meta, indent=2))
    return 0
