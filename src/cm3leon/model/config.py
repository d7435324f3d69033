"""The decoder's configuration and its named presets.

Defaults follow CM3Leon (Yu et al. 2023, arXiv:2309.02591, Sec. 3 "Model"): an OPT-like
pre-LN decoder with no biases, no dropout, LayerNorm without learnable parameters, learned
absolute positions, truncated-normal init and a 4096-token context.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cm3leon.errors import CM3LeonError
from cm3leon.utils.dataclass_io import from_dict_strict
from cm3leon.utils.presets import lookup

# Activations the decoder supports; names match `transformers.activations.ACT2FN`, so an
# exported checkpoint runs the same function under `OPTForCausalLM`.
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")

# Paper vocabulary: 56,320 text BPE tokens + 8,192 VQ codes + our 20 specials
# (<pad> <eos> <break> <eoss> and 16 sentinels, see tokenizers/vocab.py).
PAPER_VOCAB_SIZE = 56_320 + 8_192 + 20

# Presets looked up by exact name. `tiny` is for tests, `demo` / `demo-small` for the CPU
# demo (a ~3M-parameter decoder that trains at ~17k tokens/s on a laptop CPU);
# `350m` / `760m` / `7b` are the paper's sizes (Sec. 3, Table 1: layers / d_model /
# head dim 24/1024/64, 24/1536/96, 32/4096/128). Presets without `vocab_size` need it passed.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=4, d_model=32, max_seq_len=128),
    "demo-small": dict(n_layer=4, n_head=3, d_model=192, max_seq_len=512),
    "demo": dict(n_layer=4, n_head=4, d_model=256, max_seq_len=512),
    "350m": dict(vocab_size=PAPER_VOCAB_SIZE, n_layer=24, n_head=16, d_model=1024),
    "760m": dict(vocab_size=PAPER_VOCAB_SIZE, n_layer=24, n_head=16, d_model=1536),
    "7b": dict(vocab_size=PAPER_VOCAB_SIZE, n_layer=32, n_head=32, d_model=4096),
}


@dataclass
class ModelConfig:
    """Hyper-parameters of `CM3LeonTransformer`; every paper choice is a field."""

    vocab_size: int  # unified vocabulary size (Vocab.size); the embedding table is padded up
    n_layer: int = 24  # 350M model: 24 layers (paper Table 1)
    n_head: int = 16  # 350M model: head dim 64 = 1024 / 16
    d_model: int = 1024  # 350M model width
    d_ff: int | None = None  # MLP width; None -> 4 * d_model, as in OPT
    max_seq_len: int = 4096  # context length (paper Sec. 3: 4096 tokens)
    activation: str = "relu"  # the paper follows OPT, whose MLP uses ReLU
    # Gated MLP (GLU, Shazeer 2020): fc2(act(gate(x)) * fc1(x)); with activation "silu" this
    # is the SwiGLU of Llama and of the Chameleon / LlamaGen / Janus / Emu3 decoders: its
    # product of two projections models interactions of two input features directly. On the
    # demo it did not teach the model to match a question's word with the picture (VQA
    # existence at chance either way, cm3leon/run/config.py), so no preset uses it. False: the
    # paper's (OPT's) plain MLP. Default width with gating: 8/3 * d_model rounded up to a
    # multiple of 64, the plain MLP's parameters.
    glu: bool = False
    tie_embeddings: bool = True  # output head shares the token embedding, as in OPT
    init_std: float = 0.006  # truncated normal std, cut at +-3 std (paper Sec. 3)
    pos_init_std: float = 0.0002  # learned positions start near 0 (paper Sec. 3)
    norm_eps: float = 1e-5  # LayerNorm epsilon; OPT (and so HF export) uses 1e-5
    # Embedding rows are padded to a multiple of this for efficient matmuls and sharding.
    # The padded rows are never seen: `forward` slices logits to `vocab_size` columns.
    pad_vocab_to_multiple: int = 64
    # Position ids: 0 = the usual 0, 1, 2, ... from the document's start (OPT, the paper).
    # N > 0 = segment positions: a token's position is (segment number) x N + (its index in
    # the segment, at most N - 1), segments being separated by the `segment_delimiters` tokens
    # (`<break>`, `<eos>`). An image code's position then names its cell of the code grid and
    # a caption's words sit at the same positions in every document, whatever the lengths of
    # the text before them (cm3leon.model.positions). The CPU pipeline presets turn it on
    # (measured in cm3leon/run/config.py); the paper presets keep plain positions. Callers pass
    # these position ids; HF OPT takes them as `position_ids`.
    segment_positions: int = 0
    segment_delimiters: list[int] = field(default_factory=list)
    # With segment positions: False drops the segment number, so positions restart at 1 in
    # every segment (0 stays the document's first token) and every image's k-th code shares
    # one position, whichever document of the sequence it is in.
    segment_numbers: bool = True
    # With segment positions: True adds a second learned table of N rows indexed by the index
    # in the segment (position % N), shared by every segment, to the position table: the k-th
    # code of every image then shares a vector (its cell of the code grid) while the segment
    # number stays in the position, so attention can match a cell across images (an edit's
    # source and target, a retrieved image and the query's). Exported to OPT as the one
    # summed table. False: the position table alone.
    shared_segment_positions: bool = False
    # > 0: the image codes' embedding rows start from the image tokenizer's codebook (its
    # principal directions, this std per element) instead of noise alone, so codes of alike
    # patches start alike (`CM3LeonTransformer.init_image_embeddings`, applied by `cm3leon
    # pretrain` to a fresh model). 0: the paper's init for every row.
    image_embedding_init: float = 0.0
    image_embedding_power: float = 1.0  # each principal direction's spread ** power (0.5: flatter)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len", "pad_vocab_to_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CM3LeonError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff < 1):
            raise CM3LeonError(f"ModelConfig.d_ff must be a positive integer or null, got {self.d_ff!r}")
        if self.d_model % self.n_head:
            raise CM3LeonError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        if not isinstance(self.glu, bool):
            raise CM3LeonError(f"ModelConfig.glu must be true or false, got {self.glu!r}")
        if self.activation not in ACTIVATIONS:
            raise CM3LeonError(f"ModelConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.segment_positions, int) or self.segment_positions < 0:
            raise CM3LeonError(f"ModelConfig.segment_positions must be an integer >= 0, got {self.segment_positions!r}")
        self.segment_delimiters = [int(t) for t in self.segment_delimiters]
        if self.segment_positions and not self.segment_delimiters:
            raise CM3LeonError("ModelConfig.segment_positions needs segment_delimiters (the <break> and <eos> ids)")
        if not isinstance(self.shared_segment_positions, bool):
            raise CM3LeonError(f"ModelConfig.shared_segment_positions must be true or false, got "
                               f"{self.shared_segment_positions!r}")
        if self.shared_segment_positions and not self.segment_positions:
            raise CM3LeonError("ModelConfig.shared_segment_positions needs segment_positions > 0")
        if self.segment_positions > self.max_seq_len:
            raise CM3LeonError(f"ModelConfig.segment_positions ({self.segment_positions}) exceeds max_seq_len "
                               f"({self.max_seq_len})")
        for name in ("image_embedding_init", "image_embedding_power"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise CM3LeonError(f"ModelConfig.{name} must be a number >= 0, got {value!r}")
        for name in ("init_std", "pos_init_std", "norm_eps"):
            if not getattr(self, name) > 0:
                raise CM3LeonError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.glu:
            return -(-8 * self.d_model // (3 * 64)) * 64
        return 4 * self.d_model

    @property
    def mlp_matrices(self) -> int:
        """How many d_model x ffn_dim matrices an MLP holds (3 gated, 2 plain)."""
        return 3 if self.glu else 2

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to_multiple
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """The preset called exactly `name` (see PRESETS), with fields overridden."""
        values = {**lookup(PRESETS, name, "model"), **overrides}
        if "vocab_size" not in values:
            raise CM3LeonError(f"model preset {name!r} needs vocab_size= (the unified Vocab.size)")
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a dict (e.g. config.json); unknown keys are an error naming them."""
        if "vocab_size" not in d:
            raise CM3LeonError("model config: missing field 'vocab_size'")
        return from_dict_strict(cls, d, "model config")

    def replace(self, **changes: Any) -> "ModelConfig":
        return replace(self, **changes)
