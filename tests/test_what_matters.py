"""Notebook 08's benchmark (peft_lab.benchmarks.what_matters): its smoke profile writes a file of the right shape,
its helpers do what they say, and the committed results give the verdicts notebook 08 prints."""
from __future__ import annotations

import json
import math

import nbformat
import pytest

from peft_lab.benchmarks import what_matters as wm
from peft_lab.benchmarks import what_matters_report as report
from peft_lab.corpus import COLORS
from peft_lab.paths import data_dir

NOTEBOOK = data_dir().parent / "notebooks" / "08_what_matters.ipynb"
RUN_KEYS = {"lr", "seed", "train_loss", "loss_steps", "loss_curve", "val_loss", "val_acc", "ppl", "train_s"}


def test_smoke_profile_writes_the_file_the_notebook_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "wm.json"
    wm.main(["--smoke", "--out", str(out), "--jobs", "1"])
    res = json.loads(out.read_text())
    p = wm.SMOKE
    assert res["complete"] and res["configs"] == [c.name for c in p.configs]
    assert set(res["environment"]) >= {"command", "commit", "torch", "transformers", "peft", "machine", "load_start"}
    assert set(res["sweeps"]) == set(res["configs"])
    for name, sw in res["sweeps"].items():
        c = next(c for c in p.configs if c.name == name)
        assert sw["chosen_lr"] in sw["lrs"] and set(sw["lrs"]) >= set(c.grid), name
        assert {r["lr"] for r in sw["runs"]} == set(sw["lrs"])
        for r in sw["runs"]:
            assert set(r) == RUN_KEYS, name
            assert len(r["loss_curve"]) == len(r["loss_steps"]) == p.checkpoints and r["loss_steps"][-1] == c.steps
            assert 0 <= r["val_acc"] <= 1 and r["val_loss"] > 0
        # the chosen rate has the lowest mean validation loss of those tried; every seed ran at it
        losses = report.loss_by_rate(sw, None if c.every_seed else p.seeds[0])
        assert sw["chosen_lr"] == min(sw["lrs"], key=losses.get)
        assert [r["seed"] for r in report.runs_at(sw)] == list(p.seeds)
        if c.every_seed:
            assert all(len([r for r in sw["runs"] if r["lr"] == lr]) == len(p.seeds) for lr in sw["lrs"])


def test_interpolated_best_finds_a_parabolas_vertex_and_stays_on_the_grid_at_an_edge():
    f = lambda lr: (math.log10(lr) + 2.3) ** 2          # noqa: E731  minimum at 10**-2.3 ≈ 5.0e-3
    assert math.isclose(report.interpolated_best({lr: f(lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2)}), 10 ** -2.3,
                        rel_tol=1e-6)
    assert report.interpolated_best({1e-3: 1.0, 3e-3: 2.0, 1e-2: 3.0}) == 1e-3
    assert report.separated([1, 2], [3, 4]) == -1 and report.separated([3, 5], [1, 4]) == 0


def test_facts_are_distinct_single_token_colours():
    from peft_lab.models import load_base_model
    _, tok = load_base_model("tiny", device="cpu")
    facts = wm.make_facts(128)
    assert len({f["prompt"] for f in facts}) == 128 and {f["answer"] for f in facts} <= set(COLORS)
    assert all(len(tok.encode(" " + c)) == 1 for c in COLORS)
    assert wm.make_facts(128) == facts                       # deterministic


def test_placement_configs_are_matched_in_trainable_parameters():
    import copy

    from peft_lab.measure import count_parameters
    from peft_lab.models import load_base_model
    base, _ = load_base_model("tiny", device="cpu")
    cfg = {c.name: c for c in wm.FULL.configs}
    counts = {n: count_parameters(wm.build(cfg[n], copy.deepcopy(base)))[0]
              for n in ("attention r=8", "all layers r=3")}
    assert counts["attention r=8"] == counts["all layers r=3"] == 4 * 6144


@pytest.fixture(scope="module")
def results():
    return report.load()


def test_committed_results_have_three_seeds_and_a_verdict_for_every_claim(results):
    """Every sweep in the file is whole (three seeds at its chosen rate, a grid of three or more, the chosen rate
    the lowest loss); a claim whose sweeps the file lacks says "not measured", and only then."""
    assert len(results["setting"]["seeds"]) >= 3
    assert results["configs"] == [c.name for c in wm.FULL.configs]
    assert results["complete"] == (set(results["sweeps"]) == set(results["configs"]))
    for name, sw in results["sweeps"].items():
        assert len(sw["lrs"]) >= 3, name
        assert len(report.runs_at(sw)) == len(results["setting"]["seeds"]), name
        # the lowest mean loss over the seeds where every seed ran every rate, else seed 0's
        losses = report.loss_by_rate(sw, None if sw["config"]["every_seed"] else results["setting"]["seeds"][0])
        assert sw["chosen_lr"] == min(sw["lrs"], key=losses.get), name
    v = report.verdicts(results)
    assert list(v) == list(report.CLAIMS)
    for claim, x in v.items():
        lacks = [n for n in report.NEEDS[claim] if n not in results["sweeps"]]
        assert (x["verdict"] == report.NOT_MEASURED) == bool(lacks), claim
        assert x["verdict"] in report.VERDICTS + (report.NOT_MEASURED,)


def test_notebook_prints_the_committed_files_verdicts(results):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    for claim, v in report.verdicts(results).items():
        assert report.verdict_line(claim, v) in outputs, (claim, v["verdict"])


def test_guard_keeps_the_measured_numbers_after_its_reason():
    measured = {"verdict": report.VERDICTS[0], "ratios": [9.0], "text": "ratio 9.0×"}
    assert report.guarded(None, measured) is measured
    stop = {"verdict": report.VERDICTS[2], "not_learned": {"LoRA r=16": 0.5}, "text": "not learned"}
    out = report.guarded(stop, measured)
    assert out["verdict"] == report.VERDICTS[2] and out["measured"] == report.VERDICTS[0]
    assert out["ratios"] == [9.0] and out["text"].startswith("not learned") and "ratio 9.0×" in out["text"]


def _needs(results, claim):
    if any(n not in results["sweeps"] for n in report.NEEDS[claim]):
        pytest.skip(f"the committed file has no runs for {claim}")


def test_rate_ratio_always_reports_the_measured_ratio(results):
    """08.ex1 asks for §4's ratio: it is printed whether or not the guard stops the verdict."""
    _needs(results, "rate ratio")
    v = report.rate_ratio(results)
    assert len(v["ratios"]) == len(results["setting"]["seeds"]) and f"mean {report.mean(v['ratios']):.1f}×" in v["text"]


def test_capacity_is_inconclusive_when_full_fine_tuning_does_not_memorise_the_facts(results):
    import copy
    _needs(results, "capacity")
    res = copy.deepcopy(results)
    for r in res["sweeps"]["facts full FT"]["runs"]:
        r["val_acc"] = 0.5
    v = report.capacity(res)
    assert v["verdict"] == report.VERDICTS[2] and "facts full FT" in v["not_learned"]


def test_family_reads_every_configuration_at_seed_0s_rate(results):
    """One rule for all six, plain LoRA included: the runs at the rate of seed 0's lowest validation loss."""
    _needs(results, "family")
    seeds = results["setting"]["seeds"]
    v = report.family(results)
    for n in report.FAMILY:
        sw = results["sweeps"][n]
        losses = report.loss_by_rate(sw, seeds[0])
        assert v["rates"][n] == min(losses, key=losses.get), n
        if not sw["config"]["every_seed"]:
            assert v["rates"][n] == sw["chosen_lr"], n
        assert v["seeds_acc"][n] == [100 * r["val_acc"] for r in report.runs_at(sw, v["rates"][n])], n
