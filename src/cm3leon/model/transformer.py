"""The CM3Leon decoder: an OPT-like pre-LN transformer with a static KV cache.

Yu et al. 2023, "Scaling Autoregressive Multi-Modal Models: Pretraining and Instruction
Tuning", arXiv:2309.02591, Sec. 3: no bias terms, no dropout, LayerNorm without learnable
parameters, learned absolute positions (init std 0.0002), truncated-normal init (std 0.006,
cut at +-3 std), output projections initialised to 0. This is exactly HF `OPTForCausalLM`
with `enable_bias=False, layer_norm_elementwise_affine=False` (see convert/hf_opt.py).

Decoding follows gpt-fast: `setup_caches(B, S)` allocates static K/V buffers and
`forward(tokens, input_pos=...)` writes the slots `input_pos` and attends over all S slots
under a causal mask on slot index. Left-padded batches pass `position_ids` (positions
shifted by each row's pad count) and `attn_mask` (False on pad slots).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cm3leon.errors import CM3LeonError
from cm3leon.model.config import ModelConfig
from cm3leon.utils.io import atomic_path, load_safetensors, read_json, write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU, HF "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # HF "gelu_new"
    "silu": F.silu,
}


class KVCache(nn.Module):
    """Static key/value buffers for `max_batch_size` rows and `max_seq_len` slots."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_head: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (max_batch_size, n_head, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at slots input_pos (T,); return the B rows' full caches."""
        B = k.size(0)
        self.k_cache[:B, :, input_pos] = k.to(self.k_cache.dtype)
        self.v_cache[:B, :, input_pos] = v.to(self.v_cache.dtype)
        return self.k_cache[:B], self.v_cache[:B]  # (B, nh, S, hs)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.d_model
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, input_pos: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, nh, T, hs)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nh, S, hs)
            if mask is not None and mask.size(-1) < k.size(2):  # attend over the first slots only
                k, v = k[:, :, : mask.size(-1)], v[:, :, : mask.size(-1)]
            k, v = k.to(q.dtype), v.to(q.dtype)
        if mask is None:  # plain causal self-attention: lets SDPA pick a fused kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.fc2 = nn.Linear(config.ffn_dim, config.d_model, bias=False)
        self.act = _ACTIVATIONS[config.activation]
        # config.glu: a gate projection, act(gate(x)) * fc1(x) (SwiGLU with silu)
        self.gate = nn.Linear(config.d_model, config.ffn_dim, bias=False) if config.glu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.fc2(self.act(self.fc1(x)))
        return self.fc2(self.act(self.gate(x)) * self.fc1(x))


class Block(nn.Module):
    """Pre-LN block; LayerNorm has no weight or bias (paper Sec. 3)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.d_model, self.eps = config.d_model, config.norm_eps
        self.attn = Attention(config)
        self.mlp = MLP(config)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.d_model,), eps=self.eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, input_pos: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm(x), mask, input_pos)
        return x + self.mlp(self.norm(x))


class CM3LeonTransformer(nn.Module):
    """Decoder-only transformer over the unified text + image vocabulary.

    Parameters: `tok_embeddings` (padded_vocab, d), `pos_embeddings` (max_seq_len, d),
    `blocks.{i}.attn.{q,k,v,o}_proj`, `blocks.{i}.mlp.{fc1,fc2}`, and `lm_head` only when
    embeddings are untied. The final LayerNorm has no parameters."""

    partial_head = True  # forward(head_rows=..., last_only=...) computes part of the logits (decoding)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.pos_embeddings = nn.Embedding(config.max_seq_len, config.d_model)
        # config.shared_segment_positions: one more row per index in a segment, shared by all segments
        self.cell_embeddings = (nn.Embedding(config.segment_positions, config.d_model)
                                if config.shared_segment_positions else None)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.reset_parameters()

    # --- init ----------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Paper Sec. 3 init: trunc-normal(std, +-3 std) everywhere, positions with std
        0.0002, attention out-proj and MLP down-proj at 0. No-op on the meta device."""
        if self.tok_embeddings.weight.is_meta:
            return
        std, pstd = self.config.init_std, self.config.pos_init_std
        for name, p in self.named_parameters():
            if name.endswith(("attn.o_proj.weight", "mlp.fc2.weight")):
                nn.init.zeros_(p)
            elif name in ("pos_embeddings.weight", "cell_embeddings.weight"):
                nn.init.trunc_normal_(p, std=pstd, a=-3 * pstd, b=3 * pstd)
            else:
                nn.init.trunc_normal_(p, std=std, a=-3 * std, b=3 * std)

    @torch.no_grad()
    def init_image_embeddings(self, codebook: torch.Tensor, image_offset: int, std: float,
                              power: float = 1.0) -> None:
        """Start the image codes' embedding rows from what the codes look like: the image
        tokenizer's codebook vectors (K, D), centred, in their principal directions (padded
        by a fixed random orthonormal map when D < d_model), each direction's spread raised to
        `power` (1: the codebook's geometry; 0.5 lifts the small directions that tell alike
        patches apart, e.g. a pattern under a dominant colour), scaled to `std` per element,
        added to the random init. Codes of alike patches then start with alike embeddings
        (and, tied, alike output rows). The paper is silent on it; `ModelConfig.
        image_embedding_init` turns it on (used by `cm3leon pretrain` on a fresh model)."""
        K, d = codebook.shape[0], self.config.d_model
        if not 0 <= image_offset <= self.config.vocab_size - K:
            raise CM3LeonError(f"init_image_embeddings: {K} codes at offset {image_offset} do not fit the "
                               f"vocabulary of {self.config.vocab_size}")
        c = codebook.detach().double().cpu()
        c = c - c.mean(0)
        u, sv, _ = torch.linalg.svd(c, full_matrices=False)
        x = u * sv.pow(power)  # (K, r): principal coordinates, largest variance first
        if x.shape[1] >= d:
            x = x[:, :d]
        else:
            gen = torch.Generator().manual_seed(0)
            q, _ = torch.linalg.qr(torch.randn(d, x.shape[1], generator=gen, dtype=torch.float64))
            x = x @ q.T  # (K, d), distances kept
        x = x * (std / x.std().clamp_min(1e-12))
        w = self.tok_embeddings.weight
        w[image_offset:image_offset + K] += x.to(w.dtype).to(w.device)

    # --- KV cache ------------------------------------------------------------------------
    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> None:
        """Allocate static KV caches (dtype/device default to the model's)."""
        if not 1 <= max_seq_len <= self.config.max_seq_len:
            raise CM3LeonError(
                f"setup_caches: max_seq_len must be in [1, {self.config.max_seq_len}] (the model's "
                f"context), got {max_seq_len}"
            )
        if max_batch_size < 1:
            raise CM3LeonError(f"setup_caches: max_batch_size must be >= 1, got {max_batch_size}")
        ref = self.tok_embeddings.weight
        dtype = dtype or ref.dtype
        device = device if device is not None else ref.device
        for block in self.blocks:
            block.attn.kv_cache = KVCache(max_batch_size, max_seq_len, self.config.n_head,
                                          self.config.head_dim, dtype, device)

    def reset_caches(self) -> None:
        """Drop the KV caches (frees their memory); `forward` then needs no `input_pos`."""
        for block in self.blocks:
            block.attn.kv_cache = None

    @property
    def has_caches(self) -> bool:
        return len(self.blocks) > 0 and self.blocks[0].attn.kv_cache is not None

    # --- forward -------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, reduction: str = "mean",
                head_rows: tuple[int, int] | None = None, last_only: bool = False,
                loss_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens (B, T) -> (logits (B, T, vocab_size), loss or None).

        targets: (B, T) next-token ids, -100 ignored; loss = mean fp32 cross-entropy over
            the other positions (0 when none is counted).
        reduction: "mean" (above) or "none": the (B, T) fp32 per-token losses, 0 where
            ignored (the trainer splits them by modality without a second pass).
        input_pos: (T,) cache slots written by this call (needs `setup_caches`); attention
            then covers cache slots [0, S) causally by slot index. Prefill: arange(T);
            decode: tensor([t]).
        position_ids: (T,) or (B, T) positions for the learned position embedding; default
            input_pos, else arange(T). Left-padded rows pass positions shifted by their pad count.
        attn_mask: (B, 1, T, S) bool, True = may attend; S = T uncached, the cache length
            cached. Combined with causality; a token always attends to itself, so pad rows
            stay finite. Cached, S may also be shorter than the cache: attention then covers
            slots [0, S) only (decoding passes the slots filled so far, not the empty rest).
        Logits of the padded vocabulary rows are sliced off (never returned, never sampled).
        head_rows: (lo, hi): only the output head's rows [lo, hi) are computed (a view of the
            weight, no copy): logits (B, T, hi - lo) for ids lo..hi-1, e.g. the image codes on
            an image step, whose other logits a constraint masks anyway. Not with targets.
        last_only: logits of the last position only (B, 1, ...), e.g. a prefill's. Not with targets.
        loss_index: with targets, the flat indices (N,) into (B*T) of the positions whose target
            is not ignored (`loss_positions(targets)`, computed where the targets are, so no
            device sync): the output head and the loss run on those rows only (an SFT block's
            prompt positions take no loss) and the logits returned are theirs, (N, vocab_size).
            The loss is the same, up to float rounding.
        """
        B, T = tokens.shape
        if targets is not None and (head_rows is not None or last_only):
            raise CM3LeonError("forward: head_rows / last_only compute part of the logits; no loss with them")
        if input_pos is not None:
            if not self.has_caches:
                raise CM3LeonError("forward: input_pos given but setup_caches() was not called")
            if B > self.blocks[0].attn.kv_cache.k_cache.size(0):
                raise CM3LeonError(f"forward: batch of {B} rows exceeds the KV cache's max_batch_size "
                                   f"{self.blocks[0].attn.kv_cache.k_cache.size(0)}")
        elif position_ids is None and T > self.config.max_seq_len:
            raise CM3LeonError(f"forward: {T} tokens exceed the model's max_seq_len {self.config.max_seq_len}")
        if position_ids is None:
            position_ids = input_pos if input_pos is not None else torch.arange(T, device=tokens.device)
        x = self.tok_embeddings(tokens) + self.position_embedding(position_ids)  # (B, T, d)
        mask = self._attention_mask(B, T, input_pos, attn_mask, tokens.device)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, input_pos, use_reentrant=False)
            else:
                x = block(x, mask, input_pos)
        if last_only:
            x = x[:, -1:]
        if loss_index is not None:
            if targets is None:
                raise CM3LeonError("forward: loss_index needs targets")
            x = x.reshape(-1, x.size(-1)).index_select(0, loss_index)  # (N, d)
            targets = targets.reshape(-1).index_select(0, loss_index)
        x = F.layer_norm(x, (self.config.d_model,), eps=self.config.norm_eps)
        head = self.tok_embeddings.weight if self.lm_head is None else self.lm_head.weight
        if head_rows is not None:
            lo, hi = head_rows
            if not 0 <= lo < hi <= self.config.vocab_size:
                raise CM3LeonError(f"forward: head_rows {head_rows} outside [0, {self.config.vocab_size})")
            logits = F.linear(x, head[lo:hi])  # (B, T, hi - lo)
        else:
            logits = F.linear(x, head)[..., : self.config.vocab_size]  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            flat_targets = targets.reshape(-1)
            if reduction == "none" and loss_index is not None:
                picked = F.cross_entropy(logits.float(), flat_targets, ignore_index=-100, reduction="none")
                loss = picked.new_zeros(B * T).index_copy(0, loss_index, picked).view(B, T)  # (B, T)
            elif reduction == "none":
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), flat_targets,
                                       ignore_index=-100, reduction="none").view(targets.shape)  # (B, T)
            elif reduction == "mean":
                losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), flat_targets,
                                         ignore_index=-100, reduction="sum")
                loss = losses / (flat_targets != -100).sum().clamp(min=1)
            else:
                raise CM3LeonError(f"forward: reduction must be 'mean' or 'none', got {reduction!r}")
        return logits, loss

    def position_embedding(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The learned position vectors of `position_ids` (any shape -> (..., d))."""
        pos = self.pos_embeddings(position_ids)
        if self.cell_embeddings is None:
            return pos
        return pos + self.cell_embeddings(position_ids % self.config.segment_positions)

    @torch.no_grad()
    def position_table(self) -> torch.Tensor:
        """(max_seq_len, d): every position's vector as one table (what OPT's table holds)."""
        return self.position_embedding(torch.arange(self.config.max_seq_len, device=self.pos_embeddings.weight.device))

    def _attention_mask(self, B: int, T: int, input_pos: torch.Tensor | None,
                        attn_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """Bool (B|1, 1, T, S) mask, True = attend; None means plain causal over T."""
        if input_pos is None:
            if attn_mask is None:
                return None
            q_pos, S = torch.arange(T, device=device), T
        else:
            q_pos, S = input_pos, self.blocks[0].attn.kv_cache.k_cache.size(2)
            if attn_mask is not None and attn_mask.dim() == 4 and 0 < attn_mask.size(-1) < S:
                S = attn_mask.size(-1)  # the first S slots only (those written so far)
                if q_pos.device.type == "cpu" and int(q_pos.max()) >= S:  # (no device sync on CPU)
                    raise CM3LeonError(f"forward: attn_mask covers cache slots [0, {S}) but input_pos writes slot "
                                       f"{int(q_pos.max())}: the mask must cover every slot written so far")
        slots = torch.arange(S, device=device)
        causal = slots[None, :] <= q_pos[:, None]  # (T, S)
        if attn_mask is None:
            return causal[None, None]  # (1, 1, T, S)
        if attn_mask.dim() != 4 or attn_mask.shape[-2:] != (T, S) or attn_mask.size(1) != 1:
            raise CM3LeonError(f"forward: attn_mask must have shape (B, 1, {T}, {S}), got {tuple(attn_mask.shape)}")
        itself = slots[None, :] == q_pos[:, None]  # (T, S)
        return causal & (attn_mask.bool() | itself)  # (B, 1, T, S)

    # --- bookkeeping ---------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; `exclude_embeddings` drops the token and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel() + self.pos_embeddings.weight.numel()
            if self.cell_embeddings is not None:
                n -= self.cell_embeddings.weight.numel()
        return n

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write config.json + model.safetensors into out_dir (each atomically); other files
        in the directory are left alone."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        write_json(out_dir / CONFIG_NAME, self.config.to_dict())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None) -> "CM3LeonTransformer":
        """Load a model directory written by `save_pretrained` (built on meta, no double copy)."""
        path = Path(path)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"model weights not found: {weights}")
        try:
            config = ModelConfig.from_dict(read_json(path / CONFIG_NAME, "model config"))
        except (CM3LeonError, TypeError, AttributeError) as e:
            where = str(path / CONFIG_NAME)
            raise CM3LeonError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        with torch.device("meta"):
            model = cls(config)
        state = load_safetensors(weights, "model weights", device=str(device))
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise CM3LeonError(f"{weights}: weights do not match {path / CONFIG_NAME} ({e})") from None
        return model.eval()


def loss_positions(targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Flat indices (N,) into targets.reshape(-1) of the positions with a target: the
    `loss_index` of `CM3LeonTransformer.forward`. Call it on the CPU copy of the targets."""
    return (targets.reshape(-1) != ignore_index).nonzero().flatten()


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token, 6N + 12 * n_layer * d_model * seq_len (PaLM, App. B), for MFU."""
    seq_len = seq_len or config.max_seq_len
    n = config.n_layer * (4 * config.d_model**2 + config.mlp_matrices * config.d_model * config.ffn_dim)
    n += config.padded_vocab_size * config.d_model  # output head
    return 6 * n + 12 * config.n_layer * config.d_model * seq_len
