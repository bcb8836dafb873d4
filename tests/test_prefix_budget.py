"""The committed results of ``peft_lab.benchmarks.prefix_budget`` (notebook 04, section 5.2) say what they claim: the
text initialisation starts from the whole text (exactly P tokens), every seed is there, and each run's plateau step
follows from its own accuracy curve."""
from __future__ import annotations

import json

import peft_lab
from peft_lab.benchmarks import prefix_budget
from peft_lab.paths import data_dir

RESULTS = data_dir().parent / "notebooks" / "results" / "04_prefix_budget.json"


def test_init_text_is_exactly_p_tokens():
    _, tok = peft_lab.load_base_model("tiny", device="cpu")
    ids = tok(prefix_budget.INIT_TEXT)["input_ids"]
    assert len(ids) == prefix_budget.P
    assert "".join(tok.decode([i]) for i in ids) == prefix_budget.INIT_TEXT


def test_leaves_plateau():
    assert prefix_budget.leaves_plateau([50, 100, 150], [0.5, 0.6, 0.9]) == 100
    assert prefix_budget.leaves_plateau([50, 100], [0.5, 0.59]) is None
    assert prefix_budget.leaves_plateau([50, 100], [0.5, 0.95], 0.9) == 100
    # sustained: a touch of the level that falls back is not an exit (seed 1 of the committed prefix runs)
    assert prefix_budget.leaves_plateau([50, 100, 150, 200, 250], [0.5, 0.63, 0.54, 0.65, 0.7]) == 200
    assert prefix_budget.leaves_plateau([50, 100, 150], [0.5, 0.7, 0.55]) is None
    assert prefix_budget.first_reaches([50, 100, 150], [0.5, 0.63, 0.54]) == 100


def test_committed_results_are_complete_and_consistent():
    record = json.loads(RESULTS.read_text())
    assert record["complete"]
    seeds = record["setting"]["seeds"]
    assert len(seeds) >= 3
    for name, v in record["variants"].items():
        assert [r["seed"] for r in v["runs"]] == seeds, name
        if "text" in name:
            assert v["init_text"] == prefix_budget.INIT_TEXT and len(v["init_tokens"]) == record["setting"][
                "num_virtual_tokens"]
        for r in v["runs"]:
            assert r["eval_step"][-1] == v["steps"]
            assert r["leaves_plateau_step"] == prefix_budget.leaves_plateau(r["eval_step"], r["accuracy"])
            assert r["reaches_90_step"] == prefix_budget.leaves_plateau(r["eval_step"], r["accuracy"], 0.9)
            assert r["first_reaches_plateau_level_step"] == prefix_budget.first_reaches(r["eval_step"], r["accuracy"])
            assert r["final_accuracy"] == r["accuracy"][-1]
