"""peft_lab.adapters against AdapterHub `adapters` 1.3.0, weights moved both ways through its on-disk format:
logits, gradients and a short loss curve equal (the tolerance policy's "reordered" bound) for Pfeiffer, Houlsby and
parallel (ParBn) on the tiny model and the gpt2-small architecture; counts; the committed reference files are what
AdapterHub makes."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch

adapters = pytest.importorskip("adapters", reason="AdapterHub runs in the floor environment (.ci/floor)")

import peft_lab  # noqa: E402
from peft_lab.adapters import apply_adapters, bottleneck_params, bottleneck_state_dict  # noqa: E402
from peft_lab.core import fill_seeded  # noqa: E402
from peft_lab.interop_adapterhub import export_adapterhub_adapter, import_adapterhub_adapter  # noqa: E402
from peft_lab.paths import data_dir  # noqa: E402
from peft_lab.reference_adapterhub import (  # noqa: E402
    ADAPTERHUB_CONFIGS,
    CONFIGS,
    adapterhub_model,
    reference_inputs,
    write_reference,
)
from peft_lab.tolerance import COMMITTED, assert_close  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
AH = "another library: AdapterHub swaps GPT-2's Conv1D for its own Linear subclasses"
SUBLAYER = {"attention_adapters": "attn", "output_adapters": "mlp"}


def ours_key(ah_key: str) -> str | None:
    """AdapterHub's parameter name → ours (None for a non-adapter parameter)."""
    m = re.fullmatch(r"(transformer\.h\.\d+)\.(attention_adapters|output_adapters)\.adapters\.[^.]+\.(.+)", ah_key)
    return None if m is None else f"{m.group(1)}.{SUBLAYER[m.group(2)]}.{m.group(3)}"


@pytest.fixture(scope="module")
def bases():
    """Base models without adapters: the shipped tiny model and the gpt2-small architecture (random init)."""
    return {"tiny": peft_lab.load_base_model("tiny", device="cpu")[0],
            "gpt2-small": peft_lab.build_from_config("gpt2", device="cpu", seed=0)}


def pair(bases, arch: str, placement: str, direction: str, tmp_path):
    """(ours, AdapterHub's) holding the same non-zero adapter weights, moved through the on-disk format."""
    if direction == "from_adapterhub":
        theirs = adapterhub_model(placement, name="ah", model=copy.deepcopy(bases[arch]), seed=1)
        theirs.save_adapter(str(tmp_path), "ah", with_head=False, use_safetensors=True)
        ours = import_adapterhub_adapter(copy.deepcopy(bases[arch]), tmp_path)
    else:
        ours = apply_adapters(copy.deepcopy(bases[arch]), placement=placement, init="bert")
        fill_seeded(bottleneck_state_dict(ours), 2, 0.05)
        export_adapterhub_adapter(ours, tmp_path, "ours")
        theirs = copy.deepcopy(bases[arch])
        adapters.init(theirs)
        theirs.load_adapter(str(tmp_path), set_active=True, use_safetensors=True)
        theirs.train_adapter("ours")
    return ours, theirs


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("direction", ["from_adapterhub", "to_adapterhub"])
@pytest.mark.parametrize("placement", sorted(ADAPTERHUB_CONFIGS))  # parallel: AdapterHub's ParBnConfig
@pytest.mark.parametrize("arch", ["tiny", "gpt2-small"])
def test_equal_logits_gradients_and_loss_curve(bases, arch, placement, direction, tmp_path):
    ours, theirs = pair(bases, arch, placement, direction, tmp_path)
    ours.train(), theirs.train()
    mine, ref = trainable(ours), trainable(theirs)
    mapped = {ours_key(k): p for k, p in ref.items()}
    assert set(mapped) == set(mine) and len(mine) == len(ref), "the same trainable tensors, nothing else"
    ids = torch.randint(0, bases[arch].config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    out_a, out_b = ours(ids, labels=ids), theirs(ids, labels=ids)
    assert_close(out_a.logits, out_b.logits, reason=AH, what="logits")
    assert (out_a.logits - bases[arch](ids).logits).abs().max() > 1e-3, "the adapters do change the output"
    out_a.loss.backward(), out_b.loss.backward()
    for key, p in mine.items():
        assert_close(p.grad, mapped[key].grad, reason=AH, what=key)
    # a short loss curve: the same AdamW steps on both, parameters in the same order
    names = sorted(mine)
    opt_a = torch.optim.AdamW([mine[n] for n in names], lr=1e-3)
    opt_b = torch.optim.AdamW([mapped[n] for n in names], lr=1e-3)
    for step in range(3):
        for opt, model in ((opt_a, ours), (opt_b, theirs)):
            opt.step()
            opt.zero_grad()
        la, lb = ours(ids, labels=ids).loss, theirs(ids, labels=ids).loss
        assert_close(la, lb, reason=AH, what=f"loss at step {step}")
        la.backward(), lb.backward()
    for n in names:
        assert_close(mine[n], mapped[n], reason=AH, what=n)


@pytest.mark.parametrize("arch, counts", [("tiny", {"pfeiffer": 8_736, "houlsby": 17_472}),
                                          ("gpt2-small", {"pfeiffer": 894_528, "houlsby": 1_789_056})])
def test_counts_match_adapterhub(bases, arch, counts):
    d, layers = bases[arch].config.n_embd, bases[arch].config.n_layer
    for placement, expected in counts.items():
        theirs = adapterhub_model(placement, model=copy.deepcopy(bases[arch]))
        ours = apply_adapters(copy.deepcopy(bases[arch]), placement=placement)
        n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
        n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
        per_block = 2 if placement == "houlsby" else 1
        assert n_theirs == n_ours == expected == layers * per_block * bottleneck_params(d, d // 16)


def test_committed_reference_files_are_what_adapterhub_makes(tmp_path):
    from safetensors.torch import load_file
    committed = data_dir() / "reference" / "adapterhub"
    write_reference(tmp_path)
    for placement in CONFIGS:
        new, old = tmp_path / placement, committed / placement
        assert sorted(p.name for p in new.iterdir()) == sorted(p.name for p in old.iterdir())
        assert json.loads((new / "adapter_config.json").read_text()) == json.loads(
            (old / "adapter_config.json").read_text())
        a, b = load_file(str(new / "adapter.safetensors")), load_file(str(old / "adapter.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights bit for bit"
        a, b = load_file(str(new / "logits.safetensors")), load_file(str(old / "logits.safetensors"))
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["input_ids"], reference_inputs(1024))
        assert_close(a["logits"], b["logits"], COMMITTED, what=f"{placement} logits",
                     reason="the committed logits were computed on another machine")


def test_pickles_refused_with_the_flags_named(bases, tmp_path):
    theirs = adapterhub_model("pfeiffer", model=copy.deepcopy(bases["tiny"]))
    theirs.save_adapter(str(tmp_path), "reference", with_head=False)  # AdapterHub's default: a pickle
    with pytest.raises(ValueError, match=r"with_head=False, use_safetensors=True"):
        import_adapterhub_adapter(copy.deepcopy(bases["tiny"]), tmp_path)
