"""cm3leon.vllm without vLLM: the pair-wise CFG processor equals the transformers one on the same
logits, an engine loop driven like vLLM's draws CM3Leon's images, and benchmarks/vllm_serve.py
exits with one line where vLLM or the model cannot serve."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from cm3leon.convert.hf_opt import export_hf
from cm3leon.decode.processors import SamplerSettings, sample
from cm3leon.errors import CM3LeonError
from cm3leon.hf import BatchedCFGLogitsProcessor, ImageTokenConstraint
from cm3leon.vllm import (CFGRequest, PairedCFG, PairRows, check_plain_positions, image_requests, pair_codes,
                          pair_rows)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

TEXTS = ["a red circle", "a blue square on the left", "two green triangles"]


@pytest.fixture
def export(tmp_path, tiny_model_dir_factory):
    """A tiny model exported with plain positions."""
    model_dir = tiny_model_dir_factory(tmp_path / "m", TEXTS * 4, weight_std=0.05, seed=3)
    export_hf(model_dir, tmp_path / "hf")
    return model_dir, tmp_path / "hf"


def test_sample_with_a_generator_per_row_draws_each_row_from_its_own_stream():
    scores = torch.randn(3, 50)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    together = sample(scores, SamplerSettings(1.0, None, 0.9), gens)
    alone = [sample(scores[i:i + 1], SamplerSettings(1.0, None, 0.9), torch.Generator().manual_seed(s))
             for i, s in enumerate((5, 6, 7))]
    assert together.tolist() == torch.cat(alone).tolist()
    with pytest.raises(CM3LeonError, match="2 generators for 3 rows"):
        sample(scores, SamplerSettings(1.0), gens[:2])


def _requests(pairs: int, temperature: float, seed: int | None, scale: float = 2.5) -> list[CFGRequest]:
    return [CFGRequest(i % pairs, ("cond", "uncond")[i // pairs], scale, temperature, 0.9,
                       seed=None if seed is None else seed + i % pairs) for i in range(2 * pairs)]


@pytest.mark.parametrize("pairs,temperature", [(3, 0.0), (1, 1.0), (2, 1.0)])
def test_paired_cfg_equals_the_transformers_processor_on_the_same_logits(export, pairs, temperature):
    """Rows in vLLM's shuffled order, a request of another kind and a pair still prefilling in
    the batch: every pair's rows get the token BatchedCFGLogitsProcessor gives for the same
    logits (pair i sampled with seed 7 + i, one transformers processor per pair), the other
    rows are left alone; over every step of an image, constraint included."""
    _, hf = export
    prompt_length = 4
    constraint = ImageTokenConstraint.from_export(hf, prompt_length)
    V = constraint.model_vocab_size
    g = torch.Generator().manual_seed(0)
    cfg = PairedCFG(hf, V, "cpu")
    reqs = _requests(pairs, temperature, 7)
    slots = torch.randperm(2 * pairs + 3, generator=g).tolist()  # engine slots of the 2P requests + 3 others
    for slot, req in zip(slots, reqs):
        assert cfg.add_request(slot, req.to_extra_args())
    assert not cfg.add_request(slots[-3], None)  # not a CFG request
    prefilling = [CFGRequest(99, s, 2.5) for s in ("cond", "uncond")]
    for slot, req in zip(slots[-2:], prefilling):
        cfg.add_request(slot, req.to_extra_args())
    theirs = [BatchedCFGLogitsProcessor(2.5, constraint, temperature=temperature, top_p=0.9,
                                        seed=7 + i if temperature else None) for i in range(pairs)]
    for step in range(constraint.length):
        logits = torch.randn(2 * pairs + 3, V, generator=g)  # by request: 2P, the other, 2 prefilling
        order = torch.randperm(len(logits), generator=g)  # vLLM's rows this step
        steps = [step] * (2 * pairs + 1) + [-3, -3]
        out = cfg.apply(logits[order].clone(), [slots[i] for i in order], [steps[i] for i in order])
        by_request = torch.empty_like(out)
        by_request[order] = out
        for i, proc in enumerate(theirs):
            rows = [i, pairs + i]
            ids = torch.zeros(2, prompt_length + step, dtype=torch.long)
            assert torch.equal(by_request[rows], proc(ids, logits[rows]))
        assert torch.equal(by_request[2 * pairs:], logits[2 * pairs:])  # the other rows are untouched
    assert not cfg.generators  # dropped after each pair's last token


def test_pair_rows_refuses_pairs_out_of_step_and_bad_requests():
    cond, uncond = CFGRequest(0, "cond", 3.0), CFGRequest(0, "uncond", 3.0)
    assert pair_rows([None, uncond, cond], [5, 2, 2]) == [PairRows(0, cond=2, uncond=1, step=2, request=cond)]
    assert pair_rows([cond, uncond], [-4, -1]) == []  # both still prefilling
    with pytest.raises(CM3LeonError, match="not at the same step"):
        pair_rows([cond, uncond], [0, -2])  # one still prefilling
    with pytest.raises(CM3LeonError, match="not at the same step"):
        pair_rows([cond], [0])  # the other not in the batch
    with pytest.raises(CM3LeonError, match="two cond requests"):
        pair_rows([cond, cond, uncond], [0, 0, 0])
    with pytest.raises(CM3LeonError, match="different settings"):
        pair_rows([cond, CFGRequest(0, "uncond", 1.5)], [0, 0])
    assert CFGRequest.from_extra_args(None) is None and CFGRequest.from_extra_args({"other": 1}) is None
    assert CFGRequest.from_extra_args(cond.to_extra_args()) == cond
    with pytest.raises(CM3LeonError, match="stream must be one of"):
        CFGRequest(0, "both", 3.0)
    with pytest.raises(CM3LeonError, match="must be a dict"):
        CFGRequest.from_extra_args({"cm3leon_cfg": {"pair": 0, "stream": "cond", "cfg_scale": 3.0, "beam": 2}})
    with pytest.raises(CM3LeonError, match="top_p"):
        CFGRequest(0, "cond", 3.0, top_p=1.5)


def test_pair_codes_needs_both_sequences_equal_and_a_whole_image(export):
    _, hf = export
    constraint = ImageTokenConstraint.from_export(hf)
    v, n = constraint.vocab, constraint.tokens_per_image
    reqs = _requests(2, 1.0, 0)
    image = [v.image_offset + i for i in range(n)] + [v.break_id]
    other = [v.image_offset + 1] * n + [v.break_id]
    assert pair_codes([other, image, other, image], reqs, constraint) == [[1] * n, list(range(n))]
    with pytest.raises(CM3LeonError, match="pair 1: the conditional and unconditional sequences differ"):
        pair_codes([other, image, other, other], reqs, constraint)
    with pytest.raises(CM3LeonError, match="image codes then <break>"):
        pair_codes([image[:-1]] * 4, reqs, constraint)


def test_an_engine_loop_like_vllms_draws_cm3leons_images(export):
    """What vLLM does around the processor, with transformers' OPT computing each sequence's
    logits alone (unpadded, plain positions): requests in shuffled slots, rows reordered every
    step, a chunked-prefill step first, the sampler's pick = the one finite logit. Codes equal
    CM3Leon.sample_images', greedy for the batch and sampled image by image (seed + i)."""
    pytest.importorskip("transformers")
    from transformers import OPTForCausalLM

    from cm3leon.api import CM3Leon

    model_dir, hf = export
    model = OPTForCausalLM.from_pretrained(hf).eval()
    ours = CM3Leon.from_pretrained(model_dir)
    prompts = TEXTS[:2]
    for temperature, seed in ((0.0, None), (1.0, 11)):
        reqs = image_requests(hf, prompts, 2.5, temperature, 0.9, seed=seed)
        cfg = PairedCFG(hf, model.config.vocab_size, "cpu")
        g = torch.Generator().manual_seed(1)
        slots = torch.randperm(8, generator=g)[: len(reqs.requests)].tolist()
        for slot, req in zip(slots, reqs.requests):
            cfg.add_request(slot, req.to_extra_args())
        seqs = [list(ids) for ids in reqs.prompt_token_ids]
        for step in [-1] + list(range(reqs.length)):  # -1: a prefill chunk, its sample dropped
            order = torch.randperm(len(seqs), generator=g).tolist()
            with torch.no_grad():
                logits = torch.stack([model(torch.tensor([seqs[i]])).logits[0, -1] for i in order]).float()
            picked = cfg.apply(logits, [slots[i] for i in order], [step] * len(order)).argmax(-1)
            if step >= 0:
                for row, i in enumerate(order):
                    seqs[i].append(int(picked[row]))
        generated = [s[len(p):] for s, p in zip(seqs, reqs.prompt_token_ids)]
        codes = pair_codes(generated, reqs.requests, ImageTokenConstraint.from_export(hf))
        if seed is None:
            want = [list(s.codes) for s in ours.sample_images(prompts, method="cfg", cfg_scale=2.5, temperature=0.0,
                                                              num_retrieved=0)]
        else:
            want = [list(ours.sample_images([p], method="cfg", cfg_scale=2.5, temperature=1.0, top_p=0.9,
                                            seed=seed + i, num_retrieved=0)[0].codes) for i, p in enumerate(prompts)]
        assert codes == want


def test_vllm_serve_without_vllm_exits_2_with_one_line(export, monkeypatch, capsys):
    import vllm_serve

    _, hf = export
    check_plain_positions(hf)  # a plain-positions export passes
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    assert vllm_serve.main(["--hf", str(hf)]) == 2
    out, err = capsys.readouterr()
    assert err == "" and len(out.strip().splitlines()) == 1
    assert "pip install 'vllm>=0.34'" in out and "CUDA GPU" in out and "from source" in out


def test_vllm_serve_refuses_a_model_with_segment_positions(export, tmp_path, capsys):
    import vllm_serve

    from cm3leon.tokenizers.vocab import Vocab

    model_dir, _ = export
    cfg = json.loads((model_dir / "config.json").read_text())
    v = Vocab.load(model_dir)
    cfg.update(segment_positions=16, segment_delimiters=[v.eos_id, v.break_id])
    (model_dir / "config.json").write_text(json.dumps(cfg))
    export_hf(model_dir, tmp_path / "segments")
    with pytest.raises(CM3LeonError, match=r"segment_positions = 16"):
        check_plain_positions(tmp_path / "segments")
    assert vllm_serve.main(["--hf", str(tmp_path / "segments")]) == 2  # before looking for vLLM
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 and "ModelConfig.segment_positions = 16" in out
