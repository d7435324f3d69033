"""Exact conversion between a CM3Leon model directory and a Hugging Face OPT checkpoint.

The CM3Leon decoder (arXiv:2309.02591, Sec. 3) is `transformers.OPTForCausalLM` with
`enable_bias=False`, `layer_norm_elementwise_affine=False`, `do_layer_norm_before=True`,
`word_embed_proj_dim=hidden_size` and dropout 0, so weights map one to one, with two
details handled here:
- OPT's learned position table has `max_position_embeddings + 2` rows and looks up
  `position + 2` (a fairseq legacy); rows 0 and 1 are written as zeros and dropped on import.
- Our token table is padded to a multiple of `pad_vocab_to_multiple`; the export keeps only
  the `vocab_size` real rows, so an OPT runtime (transformers, vLLM) can never sample a
  padding id. Import pads the table again with zero rows.
OPT derives positions from `attention_mask` (cumsum - 1); our `position_ids` for
left-padded rows (arange - pad count) are the same numbers, so padded batches agree too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from cm3leon.errors import CM3LeonError
from cm3leon.model.config import ACTIVATIONS, ModelConfig
from cm3leon.model.transformer import CM3LeonTransformer
from cm3leon.tokenizers.vocab import SPECIAL_TOKENS
from cm3leon.utils.io import atomic_path, read_json

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding.offset
# Files that make a model directory self-describing; copied across by export and import.
SIDE_FILES = ("vocab.json", "text_tokenizer", "image_tokenizer")
# OPTConfig defaults for fields a config.json may omit (transformers OPTConfig signature).
_OPT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50272, "hidden_size": 768, "num_hidden_layers": 12, "ffn_dim": 3072,
    "max_position_embeddings": 2048, "do_layer_norm_before": True, "_remove_final_layer_norm": False,
    "word_embed_proj_dim": None, "num_attention_heads": 12, "activation_function": "relu",
    "enable_bias": True, "layer_norm_elementwise_affine": True, "tie_word_embeddings": True,
    "init_std": 0.02,
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _layer_names(n_layer: int) -> list[tuple[str, str]]:
    """(our name, OPT name without the `model.` prefix) for every per-layer weight."""
    pairs = []
    for i in range(n_layer):
        ours, hf = f"blocks.{i}.", f"decoder.layers.{i}."
        pairs += [
            (ours + "attn.q_proj.weight", hf + "self_attn.q_proj.weight"),
            (ours + "attn.k_proj.weight", hf + "self_attn.k_proj.weight"),
            (ours + "attn.v_proj.weight", hf + "self_attn.v_proj.weight"),
            (ours + "attn.o_proj.weight", hf + "self_attn.out_proj.weight"),
            (ours + "mlp.fc1.weight", hf + "fc1.weight"),
            (ours + "mlp.fc2.weight", hf + "fc2.weight"),
        ]
    return pairs


# --- configs -------------------------------------------------------------------------------
def opt_config(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The OPT `config.json` of a CM3Leon model (the original config kept under `cm3leon`)."""
    if config.norm_eps != 1e-5:
        raise CM3LeonError(
            f"model config: norm_eps={config.norm_eps} cannot be exported, OPT's LayerNorm uses 1e-5"
        )
    if config.glu:
        raise CM3LeonError(
            "model config: glu=true (a gated MLP) cannot be exported to OPT, whose MLP is fc2(act(fc1(x)))"
        )
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "word_embed_proj_dim": config.d_model,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "ffn_dim": config.ffn_dim,
        "max_position_embeddings": config.max_seq_len,
        "activation_function": config.activation,
        "do_layer_norm_before": True,
        "_remove_final_layer_norm": False,
        "enable_bias": False,
        "layer_norm_elementwise_affine": False,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "layerdrop": 0.0,
        "init_std": config.init_std,
        "tie_word_embeddings": config.tie_embeddings,
        "pad_token_id": SPECIAL_TOKENS.index("<pad>"),
        # Every CM3Leon sequence opens with <eos> (paper Sec. 2), so it is also the BOS.
        "bos_token_id": SPECIAL_TOKENS.index("<eos>"),
        "eos_token_id": SPECIAL_TOKENS.index("<eos>"),
        "use_cache": True,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,  # the name older transformers and vLLM read
        # the summed position table is a plain one (state_dict_to_hf): imported, it is that model
        "cm3leon": config.replace(shared_segment_positions=False).to_dict(),
    }


def model_config_from_opt(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A ModelConfig for an OPT config, or CM3LeonError naming each field that makes it a
    different architecture. Dropout values are accepted and ignored (inference only)."""
    if hf.get("model_type") != "opt":
        raise CM3LeonError(f"{source}: model_type is {hf.get('model_type')!r}, expected 'opt'")
    c = {**_OPT_DEFAULTS, **hf}
    hidden = c["hidden_size"]
    problems = []
    if c["enable_bias"]:
        problems.append("enable_bias must be false (CM3Leon has no bias terms)")
    if c["layer_norm_elementwise_affine"]:
        problems.append("layer_norm_elementwise_affine must be false (CM3Leon LayerNorm has no parameters)")
    if not c["do_layer_norm_before"]:
        problems.append("do_layer_norm_before must be true (CM3Leon is pre-LN)")
    if c["_remove_final_layer_norm"]:
        problems.append("_remove_final_layer_norm must be false (CM3Leon has a final LayerNorm)")
    if c["word_embed_proj_dim"] not in (None, hidden):
        problems.append(f"word_embed_proj_dim ({c['word_embed_proj_dim']}) must equal hidden_size ({hidden}): "
                        "CM3Leon has no embedding projections")
    if c["activation_function"] not in ACTIVATIONS:
        problems.append(f"activation_function {c['activation_function']!r} is not one of {ACTIVATIONS}")
    if problems:
        raise CM3LeonError(f"{source}: not a CM3Leon-architecture OPT model: " + "; ".join(problems))
    ffn = c["ffn_dim"]
    values = {
        "vocab_size": c["vocab_size"], "n_layer": c["num_hidden_layers"], "n_head": c["num_attention_heads"],
        "d_model": hidden, "d_ff": None if ffn == 4 * hidden else ffn,
        "max_seq_len": c["max_position_embeddings"], "activation": c["activation_function"],
        "tie_embeddings": bool(c["tie_word_embeddings"]), "init_std": c["init_std"], "norm_eps": 1e-5,
    }
    # Our own export keeps the full config under "cm3leon": restore the fields OPT has no
    # name for; the OPT fields stay authoritative (the config.json may have been edited).
    saved = hf.get("cm3leon")
    if isinstance(saved, dict):
        # segment positions: OPTForCausalLM computes the same logits when given these
        # models' position ids (`position_ids=cm3leon.model.positions.document_positions(...)`)
        for key in ("pos_init_std", "pad_vocab_to_multiple", "segment_positions", "segment_delimiters",
                    "segment_numbers"):
            if key in saved:
                values[key] = saved[key]
        if saved.get("d_ff") == ffn:
            values["d_ff"] = ffn
    try:
        return ModelConfig.from_dict(values)
    except CM3LeonError as e:
        raise CM3LeonError(f"{source}: {e}") from None


# --- weights -------------------------------------------------------------------------------
def state_dict_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> OPTForCausalLM state dict (`model.decoder.*`, `lm_head.weight`)."""
    V, d = config.vocab_size, config.d_model
    pos = state["pos_embeddings.weight"]
    if "cell_embeddings.weight" in state:  # shared segment positions: OPT holds the summed table
        cell = state["cell_embeddings.weight"]
        pos = pos + cell[torch.arange(pos.size(0), device=pos.device) % cell.size(0)]
    hf = {
        "decoder.embed_tokens.weight": state["tok_embeddings.weight"][:V],
        # (max_seq_len, d) -> (max_seq_len + 2, d): OPT looks up position + 2
        "decoder.embed_positions.weight": torch.cat([pos.new_zeros(POSITION_OFFSET, d), pos]),
    }
    for ours, theirs in _layer_names(config.n_layer):
        hf[theirs] = state[ours]
    out = {f"model.{k}": v.contiguous() for k, v in hf.items()}
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"][:V].contiguous()
    return out


def state_dict_from_hf(hf: dict[str, torch.Tensor], config: ModelConfig, source: str = "checkpoint"
                       ) -> dict[str, torch.Tensor]:
    """OPT state dict (`model.decoder.*` or `decoder.*`) -> our state dict; any tensor the
    architecture has no place for (biases, LayerNorm weights) is an error."""
    hf = {k.removeprefix("model."): v for k, v in hf.items()}
    V, Vp, d, S = config.vocab_size, config.padded_vocab_size, config.d_model, config.max_seq_len

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in hf:
            raise CM3LeonError(f"{source}: missing tensor {name!r}")
        t = hf.pop(name)
        if tuple(t.shape) != shape:
            raise CM3LeonError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        return t

    def pad_rows(t: torch.Tensor) -> torch.Tensor:  # (V, d) -> (padded V, d)
        return torch.cat([t, t.new_zeros(Vp - V, d)])

    state = {
        "tok_embeddings.weight": pad_rows(take("decoder.embed_tokens.weight", (V, d))),
        "pos_embeddings.weight": take("decoder.embed_positions.weight", (S + POSITION_OFFSET, d))[POSITION_OFFSET:],
    }
    for ours, theirs in _layer_names(config.n_layer):
        shape = {"fc1": (config.ffn_dim, d), "fc2": (d, config.ffn_dim)}.get(theirs.split(".")[-2], (d, d))
        state[ours] = take(theirs, shape)
    if config.tie_embeddings:
        hf.pop("lm_head.weight", None)  # a tied copy some checkpoints store
    else:
        state["lm_head.weight"] = pad_rows(take("lm_head.weight", (V, d)))
    if hf:
        raise CM3LeonError(f"{source}: tensors with no place in a CM3Leon model: {sorted(hf)[:8]}")
    return {k: v.contiguous() for k, v in state.items()}


def _load_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(read_json(index, "safetensors index")["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(hf_dir / shard)))
        return state
    if (hf_dir / "pytorch_model.bin").is_file():
        return torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
    raise FileNotFoundError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {hf_dir}")


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        p = src / name
        if p.is_dir():
            shutil.copytree(p, dst / name)
        elif p.is_file():
            shutil.copy2(p, dst / name)
        else:
            continue
        copied.append(name)
    return copied


def unified_tokenizer(text_tokenizer_json: dict, vocab) -> dict:
    """A `tokenizers` JSON whose ids are the unified vocabulary's: the BPE's ids shifted by
    `text_offset`, and every special token (`<pad>`, `<eos>`, `<break>`, `<eoss>`,
    `<mask:i>`) and image code (`<img:c>`) as an added token at its id."""
    tok = json.loads(json.dumps(text_tokenizer_json))
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CM3LeonError("text tokenizer: expected a BPE tokenizers JSON with a vocab")
    names = [*SPECIAL_TOKENS, *(f"<mask:{i}>" for i in range(vocab.num_sentinels))]
    added = [(i, t) for i, t in enumerate(names)] + [(vocab.image_offset + c, f"<img:{c}>")
                                                     for c in range(vocab.image_vocab_size)]
    # the added tokens sit in the model's vocab too: `tokenizers` then keeps their ids (it
    # numbers added tokens that the model lacks after the model's vocab instead)
    model["vocab"] = {**{t: i for i, t in added if i < vocab.text_offset},
                      **{t: int(i) + vocab.text_offset for t, i in model["vocab"].items()},
                      **{t: i for i, t in added if i >= vocab.image_offset}}
    if len(model["vocab"]) != vocab.size:
        raise CM3LeonError(f"text tokenizer: {len(model['vocab'])} tokens in the unified vocabulary, "
                           f"vocab.json says {vocab.size}")
    tok["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for i, t in added]
    return tok


def _write_hf_tokenizer(src: Path, dst: Path, config: ModelConfig) -> list[str]:
    """tokenizer.json (unified ids), tokenizer_config.json and generation_config.json (the
    image length and the guidance default) beside an export, when `src` has the tokenizers."""
    from cm3leon.tokenizers.vocab import Vocab

    if not ((src / "vocab.json").is_file() and (src / "text_tokenizer" / "tokenizer.json").is_file()):
        return []
    vocab = Vocab.load(src)
    tok = unified_tokenizer(read_json(src / "text_tokenizer" / "tokenizer.json", "text tokenizer"), vocab)
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False) + "\n", encoding="utf-8")
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<eos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "model_max_length": config.max_seq_len}, indent=2) + "\n", encoding="utf-8")
    written = ["tokenizer.json", "tokenizer_config.json"]
    vq = src / "image_tokenizer" / "config.json"
    if vq.is_file():
        from cm3leon.decode.config import DecodingConfig
        from cm3leon.tokenizers.image import VQConfig

        tokens_per_image = VQConfig.from_dict(read_json(vq, "image tokenizer config")).tokens_per_image
        decoding = DecodingConfig.from_model_dir(src)
        (dst / "generation_config.json").write_text(json.dumps({
            "bos_token_id": vocab.eos_id, "eos_token_id": vocab.eos_id, "pad_token_id": vocab.pad_id,
            "max_new_tokens": tokens_per_image + 1, "do_sample": False,
            # for image generation (cm3leon.hf): an image is tokens_per_image codes then <break>,
            # decoded with CFG at the model directory's scale and sampling temperature
            # (decoding.json), else the decoder's defaults
            "cm3leon": {"tokens_per_image": tokens_per_image, "image_offset": vocab.image_offset,
                        "image_end": vocab.size, "break_id": vocab.break_id, "cfg_scale": decoding.cfg_scale,
                        "temperature": decoding.temperature}},
            indent=2) + "\n", encoding="utf-8")
        written.append("generation_config.json")
    return written


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise CM3LeonError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


# --- public --------------------------------------------------------------------------------
def export_hf(model: CM3LeonTransformer | str | os.PathLike, out_dir: str | os.PathLike,
              dtype: str | torch.dtype | None = None) -> dict[str, Any]:
    """Write `out_dir` (replaced atomically) loadable by `OPTForCausalLM.from_pretrained`:
    config.json + model.safetensors, plus vocab.json and the tokenizer folders when `model`
    is a model directory that has them. Returns a summary."""
    from safetensors.torch import save_file

    src_dir = None
    if not isinstance(model, CM3LeonTransformer):
        src_dir = Path(model)
        model = CM3LeonTransformer.from_pretrained(src_dir)
    config = model.config
    state = state_dict_to_hf(model.state_dict(), config)
    dtype = _dtype(dtype) or next(iter(state.values())).dtype
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    hf_config = opt_config(config, dtype)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        copied = _copy_side_files(src_dir, tmp) if src_dir is not None else []
        copied += _write_hf_tokenizer(src_dir, tmp, config) if src_dir is not None else []
    return {"out": str(out_dir), "format": "OPTForCausalLM", "dtype": str(dtype).removeprefix("torch."),
            "parameters": sum(v.numel() for v in state.values()), "copied": copied}


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike,
              dtype: str | torch.dtype | None = None) -> dict[str, Any]:
    """Convert an OPT checkpoint directory of this architecture into a CM3Leon model
    directory `out_dir` (replaced atomically; vocab.json and tokenizer folders copied).
    Refuses, naming the fields, OPT configs that are a different architecture."""
    hf_dir = Path(hf_dir)
    config = model_config_from_opt(read_json(hf_dir / "config.json", "OPT config"), str(hf_dir / "config.json"))
    state = state_dict_from_hf(_load_hf_weights(hf_dir), config, source=str(hf_dir))
    dtype = _dtype(dtype)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = CM3LeonTransformer(config)
    model.load_state_dict(state, strict=True, assign=True)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        copied = _copy_side_files(hf_dir, tmp)
    return {"out": str(out_dir), "config": config.to_dict(), "parameters": model.num_parameters(),
            "copied": copied}


__all__ = ["export_hf", "import_hf", "opt_config", "model_config_from_opt", "state_dict_to_hf",
           "state_dict_from_hf"]
