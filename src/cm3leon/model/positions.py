"""Position ids of the decoder's learned position table.

Plain positions count tokens from the document's start (OPT; CM3Leon Sec. 3). Segment
positions (`ModelConfig.segment_positions = N`) restart at every segment, the run of tokens
after a `<break>` / `<eos>`: position = segment number x N + index in the segment (at most
N - 1). The k-th code of every image then has the same position whatever text precedes it, so
the model can read its cell of the code grid from its position instead of counting tokens
back to the `<break>`. The layout `<eos> (text <break> image <break>)*k text <break> image <eos>`
(Sec. 2) fixes the segment number of every part of a document. Without segment numbers
(`ModelConfig.segment_numbers = False`) the position is 1 + the index in the segment (0 only
for a document's first token, so packed documents stay apart): the k-th code of every image
in the sequence shares one position.

Everything that runs the decoder on documents computes its positions here: the training
blocks (`cm3leon.objectives.sequences.PackedStream`), prompts and generated tokens
(`cm3leon.decode.generate`) and scoring (`cm3leon.decode.rerank`).
"""

from __future__ import annotations

from typing import Sequence

import torch


def document_positions(tokens: Sequence[int] | torch.Tensor, config) -> torch.Tensor:
    """(T,) position ids of one document (or prompt) that starts at its first token."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    T = tokens.numel()
    steps = torch.arange(T, dtype=torch.long)
    stride = int(getattr(config, "segment_positions", 0) or 0)
    if not stride:
        return steps
    delim = torch.isin(tokens, torch.tensor(config.segment_delimiters, dtype=torch.long))
    seg = torch.cumsum(delim.long(), 0) - delim.long()  # delimiters before each token; a delimiter closes its segment
    starts = torch.ones(T, dtype=torch.bool)
    starts[1:] = seg[1:] != seg[:-1]
    first = torch.cummax(torch.where(starts, steps, torch.zeros_like(steps)), 0).values
    if not getattr(config, "segment_numbers", True):
        return (steps - first + (seg > 0).long()).clamp(max=stride - 1)
    return seg * stride + (steps - first).clamp(max=stride - 1)


def next_positions(prev_pos: torch.Tensor, prev_token: torch.Tensor, config) -> torch.Tensor:
    """Position ids of the tokens that follow `prev_token` at `prev_pos` (any shape): what
    `document_positions` gives the next token, one step at a time for decoding."""
    stride = int(getattr(config, "segment_positions", 0) or 0)
    if not stride:
        return prev_pos + 1
    delimiters = torch.tensor(config.segment_delimiters, dtype=torch.long, device=prev_token.device)
    if not getattr(config, "segment_numbers", True):
        return torch.where(torch.isin(prev_token, delimiters), torch.ones_like(prev_pos),
                           torch.clamp(prev_pos + 1, max=stride - 1))
    start = torch.div(prev_pos, stride, rounding_mode="floor") * stride
    return torch.where(torch.isin(prev_token, delimiters), start + stride,
                       torch.minimum(prev_pos + 1, start + stride - 1))


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool for packed blocks whose documents each start at position 0: True
    where query and key are in the same document (the model adds causality), so no document
    sees another packed before it."""
    doc = torch.cumsum((position_ids == 0).long(), dim=1)  # (B, T)
    return (doc[:, :, None] == doc[:, None, :])[:, None]
