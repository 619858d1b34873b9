"""tools/ablate.py's pieces, worked by hand: the grid, kind presets, statistics, log reading,
tables. (The end-to-end run, kill and restart: tests/e2e/test_ablate.py.)"""

import json
import math
import os

import pytest

from tools import ablate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "launchers", "configs", "tiny.yaml")


def test_grid_and_variants():
    assert ablate.parse_grid([]) == [()]
    grid = ablate.parse_grid(["model.num_moe_experts=4,8", "model.moe_router_topk=1,2"])
    assert len(grid) == 4 and grid[0] == (("model.num_moe_experts", "4"),
                                          ("model.moe_router_topk", "1"))
    assert ablate.grid_tag(grid[3]) == "num_moe_experts=8_moe_router_topk=2"
    with pytest.raises(ValueError, match="--grid"):
        ablate.parse_grid(["num_moe_experts=4"])
    variants = ablate.parse_variants(
        ["moc", "moc_ent"], [["moc_ent", "moc", "model.moc_gate_entropy_coeff=0.1"]])
    assert variants == [("moc", "moc", ()),
                        ("moc_ent", "moc", ("model.moc_gate_entropy_coeff=0.1",))]
    with pytest.raises(ValueError, match="neither a model kind"):
        ablate.parse_variants(["mystery"], [])
    with pytest.raises(ValueError, match="unknown kind"):
        ablate.parse_variants(["x"], [["x", "nope"]])


def test_plan_runs_presets_budget_and_dirs(tmp_path):
    runs, facts = ablate.plan_runs(
        TINY, str(tmp_path), ["dense", "moc", "moc_v1", "irl_only"], [1, 2],
        sets=["train.global_batch_size=8", "train.seq_length=32"], tokens=1000,
        grid=["model.num_moe_experts=4,8"])
    assert facts == {"steps": math.ceil(1000 / 256), "tokens_per_step": 256}
    assert len(runs) == 4 * 2 * 2
    by_id = {r.run_id: r for r in runs}
    dense = by_id["dense/num_moe_experts=4/seed2"]
    assert dense.run_dir == str(tmp_path / "dense" / "num_moe_experts=4" / "seed2")
    assert "model.moc_irl_steps=1" in dense.overrides and "train.seed=2" in dense.overrides
    assert "train.train_iters=4" in dense.overrides
    assert f"train.save={dense.run_dir}" == dense.overrides[-1]
    moc = by_id["moc/num_moe_experts=8/seed1"]
    assert not any(o.startswith("model.moc_irl_steps") for o in moc.overrides)  # recipe's S=2
    assert "model.num_moe_experts=8" in moc.overrides
    assert "model.moc_irl_steps=1" in by_id["moc_v1/num_moe_experts=4/seed1"].overrides
    # the fingerprint follows the settings, not the run order
    assert ablate.fingerprint(TINY, moc) == ablate.fingerprint(TINY, moc)
    assert ablate.fingerprint(TINY, moc) != ablate.fingerprint(
        TINY, by_id["moc/num_moe_experts=4/seed1"])
    with pytest.raises(ValueError, match="bogus"):
        ablate.plan_runs(TINY, str(tmp_path), ["moc"], [1], sets=["train.bogus=1"])


def test_t_critical_and_interval():
    assert ablate._T975[1] == 12.706 and ablate.t_critical(4) == pytest.approx(2.776, abs=1e-3)
    assert ablate.t_critical(1000) == pytest.approx(1.962, abs=2e-3)
    m, sd, ci = ablate.mean_std_ci([1.0, 2.0, 3.0])
    # mean 2, sd 1, CI 4.303 / sqrt(3)
    assert (m, sd) == (2.0, 1.0) and ci == pytest.approx(ablate.t_critical(2) / math.sqrt(3))
    assert ci == pytest.approx(2.484, abs=1e-3)
    m, sd, ci = ablate.mean_std_ci([5.0])
    assert m == 5.0 and math.isnan(sd) and math.isnan(ci)


def test_summarize_run_takes_the_last_record_of_a_step(tmp_path):
    recs = [
        {"step": 4, "train/loss": 6.0, "train/tokens_per_s": 100.0,
         "routing/layer00/gini": 0.5, "routing/layer00/dead_experts": 1},
        {"step": 8, "valid/loss": 5.5, "valid/ppl": 244.7},
        {"step": 8, "train/loss": 5.6, "train/tokens_per_s": 300.0,
         "routing/layer00/gini": 0.2, "routing/layer01/gini": 0.4,
         "routing/layer00/dead_experts": 0, "routing/layer01/dead_experts": 2},
        # the run was killed after step 8's checkpoint... and resumed: step 8 again
        {"step": 8, "valid/loss": 5.4},
        {"step": 12, "train/loss": 5.0, "train/tokens_per_s": 200.0,
         "routing/layer00/gini": 0.1, "routing/layer01/gini": 0.3,
         "routing/layer00/dead_experts": 1, "routing/layer01/dead_experts": 0},
        {"step": 12, "valid/loss": 5.25},
    ]
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"step": 16, "valid/lo'  # cut line
    (tmp_path / "train_log.jsonl").write_text(text)
    s = ablate.summarize_run(str(tmp_path), 256)
    assert s["curve"] == [[8, 5.4], [12, 5.25]]
    assert s["valid_loss"] == 5.25 and s["valid_ppl"] == pytest.approx(math.exp(5.25))
    assert s["final_step"] == 12 and s["tokens"] == 12 * 256
    assert s["tokens_per_s"] == 200.0  # median of 100, 200, 300
    assert s["gini"] == pytest.approx(0.2) and s["dead_experts"] == 1
    (tmp_path / "train_log.jsonl").write_text(json.dumps(recs[0]) + "\n")
    with pytest.raises(ValueError, match="no validation loss"):
        ablate.summarize_run(str(tmp_path), 256)


def test_aggregate_and_tables(tmp_path):
    runs, _ = ablate.plan_runs(TINY, str(tmp_path), ["dense", "moe"], [1, 2, 3])
    summaries = {}
    for r, loss in zip(runs, [5.0, 5.2, 5.4, 4.0, 4.1, None]):
        if loss is None:
            continue  # moe seed 3 not finished yet
        summaries[r.run_id] = {"seed": r.seed, "final_step": 10, "tokens": 2560,
                               "valid_loss": loss, "valid_ppl": math.exp(loss),
                               "curve": [[5, loss + 1], [10, loss]], "tokens_per_s": 1000.0,
                               "gini": None if r.kind == "dense" else 0.25,
                               "dead_experts": None if r.kind == "dense" else 1}
    rows = ablate.aggregate(runs, summaries)
    dense, moe = rows
    assert dense["runs"] == 3 and moe["runs"] == 2 and moe["runs_planned"] == 3
    assert dense["valid_loss_mean"] == pytest.approx(5.2)
    assert dense["valid_loss_std"] == pytest.approx(0.2)
    assert dense["valid_loss_ci95"] == pytest.approx(4.303 * 0.2 / math.sqrt(3), rel=1e-3)
    assert moe["valid_loss_ci95"] == pytest.approx(12.706 * math.sqrt(0.005) / math.sqrt(2),
                                                   rel=1e-3)
    assert dense["gini_mean"] is None and moe["gini_mean"] == 0.25
    csv_text = ablate.results_csv(rows)
    header, first = csv_text.splitlines()[:2]
    assert header.split(",") == list(ablate.CSV_COLUMNS)
    assert first.startswith("dense,dense,base,3,3,1 2 3,10,2560,5.2,0.2,")
    md = ablate.results_markdown(rows, "title")
    assert "| kind | runs | valid loss (mean ± sd) | 95% CI |" in md
    assert "| dense | 3 | 5.2000 ± 0.2000 | [4.7031, 5.6969] |" in md
    assert "| moe | 2/3 | 4.0500 ± 0.0707 |" in md and "| 0.250 | 1.0 |" in md
    png = tmp_path / "curves.png"
    ablate.plot_curves(rows, 256, str(png), "title")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_out_dir_of_other_settings_is_refused(tmp_path):
    runs, _ = ablate.plan_runs(TINY, str(tmp_path), ["moc"], [1])
    finished, todo = ablate.check_out_dir(runs, TINY)
    assert finished == [] and todo == runs
    other, _ = ablate.plan_runs(TINY, str(tmp_path), ["moc"], [1], sets=["train.lr=1e-4"])
    with pytest.raises(ValueError, match="other settings"):
        ablate.check_out_dir(other, TINY)
    ablate.write_json_atomic(os.path.join(runs[0].run_dir, ablate.DONE), {"seed": 1})
    finished, todo = ablate.check_out_dir(runs, TINY)
    assert finished == runs and todo == []
