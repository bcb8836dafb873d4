"""The committed full profile (notebook 06's head-to-head): its file, the README text made from it, and the
learning-rate criterion it uses. Fast: reads JSON and runs the tiny model on six reviews."""
import math

import pytest
import torch

from peft_lab import compare, encode_task
from peft_lab.benchmarks import head_to_head
from peft_lab.benchmarks import head_to_head_report as report
from peft_lab.corpus import generate_task
from peft_lab.data import collate
from peft_lab.tolerance import assert_close


@pytest.fixture(scope="module")
def results():
    return report.load(report.RESULTS)


def test_readme_section_is_generated_from_the_committed_results(results):
    """No hand-copied number: the README's head-to-head is exactly what the generator makes of the file."""
    text = report.README.read_text()
    section = text[text.index(report.START):text.index(report.END)] + report.END
    assert section == report.readme_section(results, report.load_second()), (
        "README's head-to-head differs from the committed results: run "
        "`python -m peft_lab.benchmarks.head_to_head --readme`")


def test_results_have_what_the_notebook_and_readme_read(results):
    env = results["environment"]
    for key in ("command", "commit", "torch", "transformers", "peft", "threads", "machine", "date", "load_start"):
        assert env[key] not in (None, "", []), key
    assert env["command"].startswith("python -m peft_lab.benchmarks.head_to_head")
    assert results["complete"] is True
    assert set(results["methods"]) == set(compare.METHODS)
    targets = [f"{t:g}" for t in results["setting"]["targets"]]
    for name in results["methods"]:
        c = results["cost"][name]
        assert c["trainable"] > 0 and c["ms_per_step"] > 0 and c["memory_mib"]["total"] > 0
        eb = results["equal_budget"][name]
        assert eb["chosen_lr"] in eb["lrs"]
        for run in eb["seeds"] + eb["grid"]:
            assert len(run["eval_step"]) == len(run["val_acc"]) and run["eval_step"][-1] == run["steps"]
            assert set(run["steps_to"]) == set(targets) and run["ppl_on"] > 0
        assert all(0 <= s["test_acc"] <= 1 for s in eb["seeds"])
        if not eb.get("same_as"):
            assert len(eb["seeds"]) >= 3 and len(eb["grid"]) >= 2      # seeds, and forgetting at two rates
            grid_loss = {g["lr"]: g["val_loss"] for g in eb["grid"]}
            assert compare.pick_lr(grid_loss)[0] == eb["chosen_lr"]   # the stated criterion made the choice
        ea = results["equal_accuracy"][name]
        assert "source" in ea
        if "seeds" in ea and compare.METHODS[name].can_switch_off:
            off, base = ea["seeds"][0]["ppl_off"], results["base"]["heldout_ppl"]
            if compare.METHODS[name].quantized_base:   # the NF4 base: close to the base, not equal (notebook 05)
                assert off != base and math.isclose(off, base, rel_tol=0.05)
            else:
                assert math.isclose(off, base, rel_tol=1e-6)


def test_answer_loss_is_the_training_loss_on_the_answer_token(tiny, one_thread):
    """Independent route: the model's own loss with only the answer token supervised (encode_task also
    supervises the end-of-text token; it is masked here)."""
    model, tok = tiny
    rows = generate_task(6, seed=7, num_clauses=5)
    enc = encode_task(rows, tok)
    for e in enc:  # keep the first supervised label (the answer), mask the EOS after it
        first = next(i for i, lab in enumerate(e["labels"]) if lab != -100)
        e["labels"] = [-100] * first + [e["labels"][first]] + [-100] * (len(e["labels"]) - first - 1)
    with torch.no_grad():
        expected = model(**collate(enc, tok.eos_token_id)).loss.item()
    assert_close(torch.tensor(compare.answer_loss(model, tok, rows, batch_size=4)), torch.tensor(expected),
                 reason="batched in fours here, in one batch by the model's loss; summed in another order")


def test_pick_lr_takes_the_lowest_loss_and_flags_edges():
    assert compare.pick_lr({1e-3: 0.5, 3e-3: 0.2, 1e-2: 0.3}) == (3e-3, False)
    assert compare.pick_lr({1e-3: 0.1, 3e-3: 0.2, 1e-2: 0.3}) == (1e-3, True)
    assert compare.pick_lr({1e-3: 0.4, 3e-3: 0.2, 1e-2: 0.1}) == (1e-2, True)


def test_full_profile_covers_every_method_with_a_grid_of_two_or_more():
    plan = head_to_head.FULL.plan
    assert set(plan) == set(compare.METHODS)
    for name, p in plan.items():
        assert p.same_as in compare.METHODS if p.same_as else len(p.grid) >= 2, name


def test_a_choice_at_an_edge_widens_the_grid_until_it_is_bracketed(monkeypatch):
    """_grid_then_seeds with a fake trainer whose loss is lowest at 0.1: a grid of 0.003–0.03 chose its top
    edge, so it adds 0.1 (bracketed after one more, 0.3) and stops; the other seeds run at 0.1."""
    calls = []

    def fake_train(s, p, name, lr, seed, steps, eval_every):
        calls.append((lr, seed))
        rec = {"lr": lr, "seed": seed, "steps": steps, "val_loss": abs(math.log10(lr) + 1), "steps_to": {}}
        return rec, None
    monkeypatch.setattr(head_to_head, "_train", fake_train)
    monkeypatch.setattr(head_to_head, "_finish", lambda s, rec, r, off: rec)
    view = head_to_head._grid_then_seeds(None, head_to_head.FULL, "x", (3e-3, 1e-2, 3e-2), 300, 25)
    assert view["widened"] == [0.1, 0.3] and view["chosen_lr"] == 0.1 and not view["edge"]
    assert view["lrs"] == [3e-3, 1e-2, 3e-2, 0.1, 0.3]
    assert [c for c in calls if c[1] != 0] == [(0.1, 1), (0.1, 2)]
    # a loss that keeps falling past the widening limit leaves the choice at the edge, and says so
    monkeypatch.setattr(head_to_head, "_train", lambda s, p, name, lr, seed, steps, eval_every: (
        {"lr": lr, "seed": seed, "val_loss": -lr, "steps_to": {}}, None))
    view = head_to_head._grid_then_seeds(None, head_to_head.FULL, "x", (3e-3, 1e-2), 300, 25)
    assert view["edge"] and len(view["widened"]) == head_to_head.FULL.widen and view["chosen_lr"] == max(view["lrs"])


def test_groups_keep_a_check_with_the_method_it_checks():
    """PEFT's LoRA and IA3 run at the rate our LoRA r=8 and IA3 chose, so each sits in their process."""
    groups = head_to_head.groups(head_to_head.FULL)
    assert sorted(n for g in groups for n in g) == sorted(head_to_head.FULL.plan)
    assert ["LoRA r=8", "PEFT LoRA r=8"] in groups and ["IA3", "PEFT IA3"] in groups
    assert groups[0][0] == "prompt"                                   # the longest budget starts first


def test_peft_ia3_learns_what_our_ia3_learns(results):
    """PEFT's IA3 row is the check of ours — same rate, seed and data, so the same curve (up to float
    rounding that training can amplify: at most two reviews of 200 apart at any evaluation)."""
    check = next(c for c in report.same_as_checks(results) if c["name"] == "PEFT IA3")
    assert check["of"] == "IA3" and check["curve_gap"] <= 1.0
    assert math.isclose(*check["loss"], rel_tol=0.05)


def test_notebook_06_argument_is_generated_from_the_committed_results(results):
    """06 §10 quotes no hand-copied number: its argument cell is what the generator makes of the file."""
    import nbformat
    nb = nbformat.read(report.NOTEBOOK, as_version=4)
    cells = report.argument_cells(nb)
    assert len(cells) == 1 and cells[0].source == report.argument(results), (
        "notebook 06's §10 argument differs from the committed results: run "
        "`python -m peft_lab.benchmarks.head_to_head --readme`")


def test_argument_is_short_and_its_facts_are_the_files(results):
    """§10 is an argument a student can hold (at most 300 words besides its table), and the facts it states are
    read from the file: the prompt seeds, the methods that got a longer budget, the runs above uniform."""
    text = report.argument(results)
    assert report.argument_words(text) <= 300
    f = report.facts(results)
    ea = results["equal_accuracy"]
    assert f["prompt_final_val"] == [s["final_val_acc"] for s in ea["prompt"]["seeds"]]
    assert set(f["regridded"]) | set(f["same_rate_only"]) == set(f["long_budget"])
    assert all(len(ea[n]["grid"]) > 1 for n in f["regridded"])
    assert all(g["ppl_on"] > 1024 for n, lr in f["above_uniform"] for g in results["equal_budget"][n]["grid"]
               if g["lr"] == lr)
    table = [l for l in text.splitlines() if l.startswith("|")]
    assert len(table) == 2 + len(f["methods"]) and all(n in text for n in f["methods"])


def test_second_run_is_the_same_plan_under_other_versions(results):
    """The README's movement table compares like with like: the committed second run (the floor environment)
    ran the same plan and setting with other library versions."""
    second = report.load_second()
    assert second is not None, f"commit a complete {report.SECOND.name} (or drop the README's sentence about it)"
    assert second["setting"] == results["setting"] and second["methods"] == results["methods"]
    assert second["plan"] == results["plan"]
    assert (second["environment"]["torch"], second["environment"]["transformers"]) != (
        results["environment"]["torch"], results["environment"]["transformers"])
    assert len(report.movement(results, second)) == len(results["methods"])


def test_every_method_that_misses_95_gets_a_grid_at_its_long_budget(monkeypatch):
    """Equal treatment: a method without its own long plan (LoRA r=8) gets, like prefix and prompt tuning, a grid of
    rates at the longer budget — its 300-step choice and the rates either side — and the other seeds at the best."""
    calls = []

    def fake_train(s, p, name, lr, seed, steps, eval_every):
        calls.append((lr, seed, steps))
        return {"lr": lr, "seed": seed, "steps": steps, "val_loss": abs(math.log10(lr) + 2), "steps_to": {}}, None
    monkeypatch.setattr(head_to_head, "_train", fake_train)
    monkeypatch.setattr(head_to_head, "_finish", lambda s, rec, r, off: rec)
    view = head_to_head.long_view(None, head_to_head.FULL, "LoRA r=8", 0.01)
    assert view["source"] == "long budget" and view["steps"] == head_to_head.FULL.extend_steps
    assert view["lrs"] == [0.003, 0.01, 0.03] and view["chosen_lr"] == 0.01 and not view["edge"]
    assert {lr for lr, seed, _ in calls if seed == 0} >= {0.003, 0.01, 0.03}
    assert all(steps == head_to_head.FULL.extend_steps for *_, steps in calls)
    prefix = head_to_head.long_view(None, head_to_head.FULL, "prefix", 0.03)       # its own plan is kept
    assert prefix["steps"] == 1000 and set(head_to_head.FULL.plan["prefix"].long_lrs) <= set(prefix["lrs"])
    assert head_to_head.around(0.01) == (0.003, 0.01, 0.03) and head_to_head.around(0.3) == (0.1, 0.3, 1.0)
