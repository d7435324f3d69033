"""Ablations (`cm3leon ablate`) on a tiny pipeline run folder made here from its stage modules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cm3leon.errors import CM3LeonError
from cm3leon.run.ablate import AblationSpec, ablation_spec, plan_variants, run_ablations

ROW_KEYS = {"name", "group", "changed", "params", "k", "order", "poisson_lambda", "decoding", "tokens", "train_flops",
            "train_seconds", "final_train_loss", "final_val_loss", "colour", "shape", "both", "fd", "clip_score",
            "model_from"}


def tiny_spec() -> AblationSpec:
    budget = dict(steps=3, seq_len=128, micro_batch_size=2, batch_tokens=256, warmup_steps=1, eval_every=0,
                  eval_batches=1, ckpt_every=0, log_every=1)
    return AblationSpec(base_preset="tiny", budget=budget, sizes=(("xs", "tiny", {"n_layer": 1}), ("tiny", "tiny", {})),
                        ks=(0, 2), base_k=2, methods=("topp", "cfg", "cdk"), num_prompts=3, num_candidates=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run folder (conftest.build_tiny_run: code shards with ONE neighbour per record, so
    k=2 needs neighbours retrieved again) and its ablations."""
    from conftest import build_tiny_run

    run = build_tiny_run(tmp_path_factory.mktemp("ablate") / "run")
    result = run_ablations(run, spec=tiny_spec())
    return run, result


def _summary(run: Path, variant: str) -> dict:
    return json.loads((run / "ablate" / variant / "model" / "train_summary.json").read_text())


def test_results_have_one_row_per_variant_with_the_documented_keys(run):
    run_dir, result = run
    names = [v.name for v in plan_variants(tiny_spec())]
    assert [r["name"] for r in result["rows"]] == names
    on_disk = json.loads((run_dir / "ablate" / "results.json").read_text())
    assert on_disk["rows"] == result["rows"]
    for r in result["rows"]:
        assert ROW_KEYS <= set(r), (r["name"], ROW_KEYS - set(r))
        assert 0.0 <= r["both"] <= 1.0 and r["fd"] >= 0 and -1.0 <= r["clip_score"] <= 1.0
    md = (run_dir / "ablate" / "results.md").read_text()
    assert all(f"| {n} |" in md for n in names)
    assert "Captioning (CIDEr) and VQA" in md  # said, not silently missing


def test_every_trained_variant_sees_the_same_token_budget_and_sizes_differ(run):
    _, result = run
    rows = {r["name"]: r for r in result["rows"]}
    trained = {r["model_from"] for r in rows.values()}
    assert trained == {"size-xs", "size-tiny", "k0", "dalle-baseline"}  # others reuse these models
    assert len({rows[n]["tokens"] for n in trained}) == 1 and rows["k0"]["tokens"] == 3 * 256
    assert rows["size-xs"]["params"] < rows["size-tiny"]["params"]
    assert rows["size-xs"]["layers"] == 1 and rows["size-tiny"]["layers"] == 2
    assert [rows[n]["k"] for n in ("k0", "k2")] == [0, 2]
    # the reference appears in every group: same model and, with the same decoding, same numbers
    assert rows["k2"]["model_from"] == rows["decode-topp"]["model_from"] == "size-tiny"
    assert rows["decode-cfg"]["eval_same_as"] == "size-tiny" and rows["decode-cfg"]["both"] == rows["size-tiny"]["both"]


def test_baseline_really_trained_left_to_right_without_masking_or_retrieval(run):
    run_dir, result = run
    base = _summary(run_dir, "dalle-baseline")
    assert base["cm3"]["poisson_lambda"] == 0.0 and base["num_retrieved"] == 0 and base["order"] == "text_first"
    ref = _summary(run_dir, "size-tiny")
    assert ref["cm3"]["poisson_lambda"] == 1.0 and ref["num_retrieved"] == 2 and ref["order"] == "random"
    assert base["tokens_seen"] == ref["tokens_seen"]
    assert not (run_dir / "ablate" / "dalle-baseline" / "model" / "index").exists()
    assert not (run_dir / "ablate" / "dalle-baseline" / "model" / "checkpoints").exists()  # only for resume
    assert (run_dir / "ablate" / "size-tiny" / "model" / "index").is_dir()  # retrieval at inference too
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["dalle-baseline"]["decoding"] == "TopP" and rows["dalle-baseline-cfg"]["model_from"] == "dalle-baseline"


def test_k_above_the_runs_neighbours_uses_a_linked_view_and_leaves_the_run_untouched(run):
    run_dir, _ = run
    assert np.load(run_dir / "tokenize" / "neighbors.npy").shape[1] == 1
    view = run_dir / "ablate" / "codes_k2"
    assert np.load(view / "neighbors.npy").shape[1] == 2
    shards = sorted(view.glob("shard-*"))
    assert shards and all(s.is_symlink() for s in shards)  # never re-tokenised
    assert _summary(run_dir, "size-tiny")["codes_dir"] == str(view)


def test_rerun_skips_finished_variants(run, monkeypatch):
    import cm3leon.eval.evaluate as evaluate
    import cm3leon.train.cli as train_cli

    run_dir, result = run

    def boom(*a, **k):
        raise AssertionError("a finished variant ran again")

    monkeypatch.setattr(train_cli, "pretrain", boom)
    monkeypatch.setattr(evaluate, "evaluate_model", boom)
    again = run_ablations(run_dir, spec=tiny_spec())
    assert again["rows"] == result["rows"]
    # another spec in the same folder is refused, not mixed in
    other = tiny_spec()
    other.budget = {**other.budget, "steps": 4}
    with pytest.raises(CM3LeonError, match="other settings"):
        run_ablations(run_dir, spec=other, variants=["k0"])


def test_plots_are_written_and_the_run_report_shows_the_ablations(run):
    from cm3leon.run.report import build_run_report

    run_dir, result = run
    for name in ("ablation_model_size", "ablation_retrieval_k", "ablation_decoding", "ablation_baseline"):
        assert (run_dir / "ablate" / f"{name}.png").stat().st_size > 1000, name
    assert sorted(result["plots"]) == sorted(p.name for p in (run_dir / "ablate").glob("*.png"))
    html = build_run_report(run_dir).read_text()
    section = html[html.index("Ablations (ablate/results.json)"):]
    assert "dalle-baseline" in section and "ablation model size" in section


def test_presets_and_bad_arguments(run, tmp_path, capsys):
    from cm3leon.cli import main

    run_dir, _ = run
    quick = ablation_spec("quick")
    assert [s[0] for s in quick.sizes] == ["xs", "demo-small", "demo"] and quick.ks == (0, 1, 2)
    full = ablation_spec("full", run_dir)  # the run's pipeline preset (quick): its pretraining budget
    assert full.budget["steps"] == 120 and full.base_preset == "demo-small"
    with pytest.raises(CM3LeonError, match="unknown ablation preset"):
        ablation_spec("huge")
    with pytest.raises(CM3LeonError, match="unknown"):
        run_ablations(run_dir, spec=tiny_spec(), variants=["k7"])
    with pytest.raises(CM3LeonError, match="no finished code shards"):
        run_ablations(tmp_path, spec=tiny_spec())
    assert main(["ablate", "--run", str(run_dir), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "dalle-baseline" in out and "6 trainings" in out
