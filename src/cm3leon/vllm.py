"""Text -> image with an exported model in vLLM (`cm3leon export hf`): the image-code constraint
and classifier-free guidance (paper Sec. 3) as one vLLM logits processor.

vLLM runs every prompt as its own request, so CFG's two streams are two requests per image:
the conditional prompt and the unconditional one (`<mask:0>` for the caption), both from
`cm3leon.hf.build_image_prompt` (`image_requests`), paired through `SamplingParams.extra_args`
(`CFGRequest`). Each engine step, `CM3LeonCFGLogitsProcessor` (vLLM's Model Runner V2
interface, `vllm.v1.worker.gpu.sample.logits_processor`, read from vLLM 0.34.0):
- finds each pair's two rows among the step's logits rows (`pair_rows`; vLLM reorders rows
  every step) and the pair's step (tokens generated so far);
- combines them (CFG), adds the constraint's mask for that step (image codes, then `<break>`),
  and draws ONE token per pair with the project's sampler and the pair's own seeded generator
  (`cm3leon.hf.guided_tokens`, the transformers recipe's code);
- writes it into BOTH rows as the only finite logit (`cm3leon.hf.force_tokens`).
Requests are sent greedy (temperature 0), so vLLM's sampler picks that one finite id in both
rows. The draw is ours, not vLLM's: vLLM 0.34 draws its Gumbel noise from a hash of (request
seed, token position, token id) (`vllm/v1/worker/gpu/sample/gumbel.py`), and a pair's two
prompts differ in length, so its two rows sit at different positions: equal logits and equal
seeds would still draw different tokens. With one finite id per row both sequences are equal
by construction; `pair_codes` checks it on the outputs and raises if they are not.

Image i of a batch is drawn with seed + i, so its codes are `CM3Leon.sample_images([text_i],
seed=seed + i)`'s (tested without vLLM, `tests/test_vllm.py`, with the same logits).

Models with segment positions (`ModelConfig.segment_positions > 0`: the CPU presets) cannot be
served: vLLM's OPT gives every token its plain position (0, 1, 2, ... per sequence) and
`check_plain_positions` refuses them; the paper presets use plain positions.

    python benchmarks/vllm_serve.py --hf runs/hf     # prompts -> PNGs, images/s vs ours and transformers
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import torch

from cm3leon.decode.guidance import Guidance
from cm3leon.decode.processors import SamplerSettings
from cm3leon.errors import CM3LeonError
from cm3leon.hf import ImageTokenConstraint, build_image_prompt, force_tokens, guided_tokens

EXTRA_ARGS_KEY = "cm3leon_cfg"  # SamplingParams.extra_args[EXTRA_ARGS_KEY] holds a CFGRequest
STREAMS = ("cond", "uncond")
# What `LLM(logits_processors=[...])` takes (vLLM imports it in the engine process).
PROCESSOR = "cm3leon.vllm:CM3LeonCFGLogitsProcessor"


@dataclass(frozen=True)
class CFGRequest:
    """One request of a CFG pair: which pair, which stream, and how the pair's token is drawn
    (both requests of a pair must carry the same settings)."""

    pair: int  # unique among the engine's live requests
    stream: str  # "cond" or "uncond"
    cfg_scale: float
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None  # the pair's generator; None: unseeded

    def __post_init__(self):
        if isinstance(self.pair, bool) or not isinstance(self.pair, int):
            raise CM3LeonError(f"CFG request: pair must be an integer, got {self.pair!r}")
        if self.stream not in STREAMS:
            raise CM3LeonError(f"CFG request: stream must be one of {STREAMS}, got {self.stream!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise CM3LeonError(f"CFG request: seed must be an integer or None, got {self.seed!r}")
        Guidance("cfg", cfg_scale=self.cfg_scale)  # each raises CM3LeonError naming a bad value
        SamplerSettings(self.temperature, self.top_k, self.top_p)

    @property
    def guidance(self) -> Guidance:
        return Guidance("cfg", cfg_scale=self.cfg_scale)

    @property
    def sampler(self) -> SamplerSettings:
        return SamplerSettings(self.temperature, self.top_k, self.top_p)

    @property
    def draw(self) -> tuple:
        """How the pair's token is drawn, but for the seed: pairs alike are guided as one batch."""
        return self.cfg_scale, self.temperature, self.top_p, self.top_k

    @property
    def settings(self) -> tuple:
        """What both requests of a pair must agree on."""
        return *self.draw, self.seed

    def to_extra_args(self) -> dict:
        return {EXTRA_ARGS_KEY: asdict(self)}

    @classmethod
    def from_extra_args(cls, extra_args: dict | None) -> "CFGRequest | None":
        """The request's CFGRequest, None for a request without one; CM3LeonError if malformed."""
        if not extra_args or EXTRA_ARGS_KEY not in extra_args:
            return None
        d = extra_args[EXTRA_ARGS_KEY]
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or not {"pair", "stream", "cfg_scale"} <= set(d) <= names:
            raise CM3LeonError(f"extra_args[{EXTRA_ARGS_KEY!r}] must be a dict with pair, stream, cfg_scale and "
                               f"optionally temperature, top_p, top_k, seed; got {d!r}")
        return cls(**d)


@dataclass(frozen=True)
class ImageRequests:
    prompt_token_ids: list[list[int]]  # conditional prompts of all texts, then the unconditional ones
    requests: list[CFGRequest]  # one per prompt, same order
    length: int  # tokens to generate per request: the image's codes, then <break> (max_tokens)


def image_requests(model_dir: str | os.PathLike, prompts: Sequence[str] | str, cfg_scale: float,
                   temperature: float = 1.0, top_p: float | None = None, top_k: int | None = None,
                   seed: int | None = None, first_pair: int = 0) -> ImageRequests:
    """The two requests of each text: `build_image_prompt`'s rows without their left padding
    (vLLM runs each sequence alone, positions from 0), paired as pair `first_pair + i`, drawn
    with seed `seed + i`."""
    batch = build_image_prompt(model_dir, prompts)
    n = len(batch.input_ids) // 2
    ids = [row[mask.bool()].tolist() for row, mask in zip(batch.input_ids, batch.attention_mask)]
    requests = [CFGRequest(first_pair + i % n, STREAMS[i // n], cfg_scale, temperature, top_p, top_k,
                           None if seed is None else seed + i % n) for i in range(2 * n)]
    return ImageRequests(ids, requests, batch.length)


@dataclass(frozen=True)
class PairRows:
    pair: int
    cond: int  # row of the conditional request in the step's logits
    uncond: int
    step: int  # tokens generated so far by both
    request: CFGRequest


def pair_rows(requests: Sequence[CFGRequest | None], steps: Sequence[int]) -> list[PairRows]:
    """The pairs to guide in one engine step. `requests[r]`: the request of logits row r (None:
    not a CFG request); `steps[r]`: its tokens generated so far (< 0 while its prompt is still
    being prefilled in chunks: vLLM discards that row's sample). A pair whose two rows are not at
    the same step (one missing, or one still prefilling) cannot be guided: CM3LeonError."""
    rows: dict[int, dict[str, int]] = {}
    for r, req in enumerate(requests):
        if req is None:
            continue
        streams = rows.setdefault(req.pair, {})
        if req.stream in streams:
            raise CM3LeonError(f"CFG pair {req.pair}: two {req.stream} requests in one batch (pair ids must be unique)")
        streams[req.stream] = r
    out = []
    for pair, streams in rows.items():
        present = list(streams.values())
        if all(steps[r] < 0 for r in present):
            continue  # still prefilling: nothing is sampled for it yet
        c, u = streams.get("cond"), streams.get("uncond")
        if c is None or u is None or steps[c] != steps[u]:
            where = ", ".join(f"{s} at step {steps[r]}" for s, r in streams.items())
            raise CM3LeonError(f"CFG pair {pair}: its two requests are not at the same step ({where}); vLLM must run "
                               "both from the start: max_num_seqs >= 2 x images and max_num_batched_tokens >= the "
                               "prompts' tokens, no preemption")
        if requests[c].settings != requests[u].settings:
            raise CM3LeonError(f"CFG pair {pair}: its requests carry different settings "
                               f"({requests[c].settings} vs {requests[u].settings})")
        out.append(PairRows(pair, c, u, int(steps[c]), requests[c]))
    return out


class PairedCFG:
    """The logits processor without vLLM: per-slot requests (`add_request`), and per step
    (`apply`) the guided token of each pair written into both of its rows."""

    def __init__(self, model_dir: str | os.PathLike, vocab_size: int, device: torch.device | str):
        self.constraint = ImageTokenConstraint.from_export(model_dir)
        if vocab_size != self.constraint.model_vocab_size:
            raise CM3LeonError(f"{model_dir}: the engine's logits have {vocab_size} columns, the export's config "
                               f"{self.constraint.model_vocab_size}")
        self.device = torch.device(device)
        self.requests: dict[int, CFGRequest] = {}  # engine slot -> its request
        self.generators: dict[int, torch.Generator] = {}  # pair -> its stream of draws

    def add_request(self, slot: int, extra_args: dict | None) -> bool:
        """A request enters `slot` (replacing any former one); True if it is a CFG request."""
        req = CFGRequest.from_extra_args(extra_args)
        if req is None:
            self.requests.pop(slot, None)
            return False
        self.requests[slot] = req
        return True

    def _generator(self, req: CFGRequest) -> torch.Generator:
        if req.pair not in self.generators:
            gen = torch.Generator(device=self.device)
            if req.seed is None:
                gen.seed()
            else:
                gen.manual_seed(req.seed)
            self.generators[req.pair] = gen
        return self.generators[req.pair]

    def apply(self, logits: torch.Tensor, slots: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
        """logits (R, V), one row per request; `slots[r]` / `steps[r]`: row r's slot and tokens
        generated so far. Rows of other requests are left as they are. Returns `logits`."""
        requests = [self.requests.get(int(s)) for s in slots]
        groups: dict[tuple, list[PairRows]] = {}
        for p in pair_rows(requests, steps):
            groups.setdefault(p.request.draw, []).append(p)
        for pairs in groups.values():
            req = pairs[0].request
            mask = torch.stack([self.constraint.mask(p.step, logits.device) for p in pairs])  # (P, V)
            gens = [self._generator(p.request) for p in pairs] if req.temperature > 0 else None
            tokens = guided_tokens(logits[[p.cond for p in pairs]], logits[[p.uncond for p in pairs]], mask,
                                   req.guidance, req.sampler, gens)  # (P,)
            rows = torch.tensor([p.cond for p in pairs] + [p.uncond for p in pairs], device=logits.device)
            force_tokens(logits, rows, tokens.repeat(2))
            for p in pairs:
                if p.step + 1 >= self.constraint.length:
                    self.generators.pop(p.pair, None)  # the pair's last token
        return logits


def pair_codes(token_ids: Sequence[Sequence[int]], requests: Sequence[CFGRequest], constraint) -> list[list[int]]:
    """Each pair's image codes (0-based, in pair order) from its requests' generated ids.
    CM3LeonError unless both sequences of every pair are equal and are the constraint's image
    codes followed by `<break>`."""
    vocab, n = constraint.vocab, constraint.tokens_per_image
    by_pair: dict[int, dict[str, list[int]]] = {}
    for ids, req in zip(token_ids, requests, strict=True):
        by_pair.setdefault(req.pair, {})[req.stream] = list(ids)
    codes = []
    for pair in sorted(by_pair):
        cond, uncond = by_pair[pair].get("cond"), by_pair[pair].get("uncond")
        if cond != uncond:
            raise CM3LeonError(f"CFG pair {pair}: the conditional and unconditional sequences differ "
                               f"({cond} vs {uncond}); the logits processor did not run on both")
        if len(cond) != n + 1 or cond[-1] != vocab.break_id or \
                not all(vocab.image_offset <= t < vocab.size for t in cond[:n]):
            raise CM3LeonError(f"CFG pair {pair}: expected {n} image codes then <break>, got {cond}")
        codes.append([t - vocab.image_offset for t in cond[:n]])
    return codes


def check_plain_positions(model_dir: str | os.PathLike) -> None:
    """CM3LeonError, naming the field, unless the exported model uses plain positions (the only
    ones vLLM's OPT computes)."""
    from pathlib import Path

    from cm3leon.convert.hf_opt import model_config_from_opt
    from cm3leon.utils.io import read_json

    path = Path(model_dir) / "config.json"
    config = model_config_from_opt(read_json(path, "model config"), str(path))
    if config.segment_positions:
        raise CM3LeonError(
            f"{path}: the model uses segment positions (ModelConfig.segment_positions = {config.segment_positions}: "
            "position ids restart at every <break> / <eos>, as the CPU presets train); vLLM's OPT gives every token "
            "its plain position, so it would compute other logits. Serve a model trained with "
            "model.segment_positions 0 (the paper presets), or use cm3leon.hf.CM3LeonOPTForCausalLM in transformers")


def _processor_class():
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

    class CM3LeonCFGLogitsProcessor(LogitsProcessor):
        """`PairedCFG` in vLLM's engine: the model directory is the engine's model, slots and
        steps come from the step's batch (no speculative decoding: one logits row per request)."""

        def __init__(self, vllm_config, req_states):
            self.prompt_len = req_states.prompt_len  # (max_num_reqs,) per slot, host copy in .np
            self.cfg = PairedCFG(vllm_config.model_config.model, req_states.vocab_size, req_states.device)

        @classmethod
        def validate_params(cls, sampling_params) -> None:
            try:
                CFGRequest.from_extra_args(sampling_params.extra_args)
            except CM3LeonError as e:
                raise ValueError(str(e)) from None

        def add_request(self, req_idx: int, sampling_params) -> bool:
            return self.cfg.add_request(req_idx, sampling_params.extra_args)

        def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
            slots = ctx.idx_mapping_np  # batch position -> slot, on the host
            if logits.shape[0] != len(slots):
                raise CM3LeonError(f"CM3LeonCFGLogitsProcessor: {logits.shape[0]} logits rows for {len(slots)} "
                                   "requests; speculative decoding is not supported")
            # tokens visible to the token being sampled (exact without speculative decoding)
            # minus the prompt = tokens generated so far
            steps = ctx.seq_lens_upper_bound_np[: len(slots)] - self.prompt_len.np[slots]
            return self.cfg.apply(logits, slots, steps)

    CM3LeonCFGLogitsProcessor.__module__ = __name__  # importable by this name (PROCESSOR)
    CM3LeonCFGLogitsProcessor.__qualname__ = "CM3LeonCFGLogitsProcessor"
    return CM3LeonCFGLogitsProcessor


def __getattr__(name: str):  # the vLLM class is built on first use (vLLM is optional)
    if name == "CM3LeonCFGLogitsProcessor":
        cls = _processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


# and CM3LeonCFGLogitsProcessor, an attribute built on first use (it needs vLLM)
__all__ = ["CFGRequest", "ImageRequests", "image_requests", "PairRows", "pair_rows", "PairedCFG", "pair_codes",
           "check_plain_positions", "PROCESSOR", "EXTRA_ARGS_KEY"]
