"""peft_lab.ia3: the equations of notebook 05 ("IA3") and equality with PEFT's IA3, both ways."""
from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_lab
from builders import MODELS, VOCAB, adamw_losses, small_gpt2, small_llama
from peft_lab.core import fill_seeded
from peft_lab.ia3 import (
    IA3Layer,
    apply_ia3,
    disable_ia3,
    ia3_config,
    ia3_layers,
    ia3_state_dict,
    load_ia3_state_dict,
    merge_ia3,
    remove_ia3,
    unmerge_ia3,
)
from peft_lab.interop import CONFIG_NAME, WEIGHTS_NAME, export_peft_adapter, import_peft_adapter
from peft_lab.measure import print_trainable_parameters
from peft_lab.tolerance import EXACT, assert_close, assert_equal, is_close

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
# PEFT's IA3 layer computes what ours does in the same order (one element-wise product before or after the
# same base layer; its extra factor 1 is exact), so logits and gradients are compared bit for bit.
SAME_ORDER = "PEFT multiplies by l before/after the same base layer, in the same order"


def randomise(model, seed: int = 1):
    """Vectors l = 1 + N(0, 0.3²): away from the identity of init, so that a comparison can fail."""
    vectors = ia3_state_dict(model)
    fill_seeded(vectors, seed, 0.3)
    for v in vectors.values():
        v.add_(1.0)
    return model


def peft_key(key: str) -> str:
    return "base_model.model." + key.replace(".ia3_l", ".ia3_l.default")


def ia3_pair(base, **kw):
    """(ours, PEFT's) on two copies of ``base`` with the same settings and the same random vectors."""
    config = peft.IA3Config(task_type="CAUSAL_LM", target_modules=kw.get("target_modules"),
                            feedforward_modules=kw.get("feedforward_modules"))
    theirs = get_peft_model(copy.deepcopy(base), config)
    ours = randomise(apply_ia3(base, **kw))
    params = dict(theirs.named_parameters())
    for key, value in ia3_state_dict(ours).items():
        assert params[peft_key(key)].shape == value.shape, key  # PEFT's shapes: (d_out, 1) or (1, d_in)
        params[peft_key(key)].data.copy_(value)
    return ours, theirs


# ---------------------------------------------------------------------------------------------------------
# Equal to PEFT
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tiny", "tiny-llama", "llama"])
def test_logits_and_gradients_equal_peft(kind):
    ours, theirs = ia3_pair(MODELS[kind]())
    a, b = ours(IDS, labels=IDS), theirs(IDS, labels=IDS)
    assert_close(a.logits, b.logits, EXACT, reason=SAME_ORDER, what="logits")
    a.loss.backward(), b.loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(grads) == len(list(ia3_layers(ours)))
    for name, layer in ia3_layers(ours):
        assert_close(layer.ia3_l.grad, grads[peft_key(f"{name}.ia3_l")], EXACT, reason=SAME_ORDER, what=name)


def test_default_targets_and_sides():
    gpt2 = apply_ia3(small_gpt2())
    sides = {n.split(".", 3)[-1]: layer.is_feedforward for n, layer in ia3_layers(gpt2)}
    assert sides == {"attn.c_attn": False, "mlp.c_proj": True}
    llama = apply_ia3(small_llama())
    sides = {n.rsplit(".", 1)[-1]: layer.is_feedforward for n, layer in ia3_layers(llama)}
    assert sides == {"k_proj": False, "v_proj": False, "down_proj": True}
    assert ia3_config(llama).target_modules == ("k_proj", "v_proj", "down_proj")
    # the default feed-forward set applies to targets given by hand, as in PEFT (no subset rule for defaults)
    mine = apply_ia3(small_gpt2(), target_modules=["c_attn", "c_proj"])
    sides = {n.split(".", 3)[-1]: layer.is_feedforward for n, layer in ia3_layers(mine)}
    assert sides == {"attn.c_attn": False, "attn.c_proj": False, "mlp.c_proj": True}
    theirs = get_peft_model(small_gpt2(), peft.IA3Config(target_modules=["c_attn", "c_proj"]))
    assert {n.split(".", 5)[-1]: m.is_feedforward for n, m in theirs.named_modules()
            if isinstance(m, peft.tuners.ia3.IA3Layer) and ".h.0." in n} == sides


def test_parameter_count_equals_peft_on_gpt2_small(capsys):
    base = peft_lab.build_from_config("gpt2", device="meta")  # counting needs shapes only
    get_peft_model(copy.deepcopy(base), peft.IA3Config(task_type="CAUSAL_LM")).print_trainable_parameters()
    print_trainable_parameters(apply_ia3(base))
    theirs, ours = capsys.readouterr().out.strip().splitlines()
    assert ours == theirs and ours.startswith("trainable params: 64,512 ||")  # (05.6): 12 · (3·768 + 3072)


def test_wrong_side_is_caught():
    """Scaling the *output* of a feed-forward module is another model: on GPT-2's square attn.c_proj (d × d)
    the same vector fits either side, and the comparison with PEFT must fail."""
    targets = ["c_attn", "attn.c_proj"]
    ours, theirs = ia3_pair(small_gpt2(), target_modules=targets, feedforward_modules=["attn.c_proj"])
    wrong = apply_ia3(small_gpt2(), target_modules=targets, feedforward_modules=[])
    load_ia3_state_dict(wrong, {k: v.reshape(-1, 1) for k, v in ia3_state_dict(ours).items()})
    expected = theirs(IDS).logits
    assert_equal(ours(IDS).logits, expected, what="input side, as PEFT")
    assert not is_close(wrong(IDS).logits, expected)


# ---------------------------------------------------------------------------------------------------------
# The equations of notebook 05
# ---------------------------------------------------------------------------------------------------------

def test_one_layer_scales_output_or_input():
    base = torch.nn.Linear(6, 4)
    x = torch.randn(3, 6)
    out_side, in_side = IA3Layer(copy.deepcopy(base)), IA3Layer(copy.deepcopy(base), is_feedforward=True)
    assert out_side.ia3_l.shape == (4, 1) and in_side.ia3_l.shape == (1, 6)
    fill_seeded({"a": out_side.ia3_l.data, "b": in_side.ia3_l.data}, 0, 1.0)
    assert_equal(out_side(x), base(x) * out_side.ia3_l.flatten(), what="(05.1)")
    assert_equal(in_side(x), base(x * in_side.ia3_l.flatten()), what="(05.2)")


def test_init_is_the_identity_and_only_vectors_train():
    base = small_gpt2()
    expected = base(IDS).logits
    model = apply_ia3(base)
    assert_equal(model(IDS).logits, expected, what="(05.3): l = 1")  # 1 · y = y in floats
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(ia3_state_dict(model))
    assert all(torch.all(v == 1) for v in ia3_state_dict(model).values())


@pytest.mark.parametrize("kind", ["gpt2", "tiny-llama"])
def test_merge_unmerge_disable(kind):
    base = MODELS[kind]()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    base_logits = base(IDS).logits
    model = randomise(apply_ia3(base))
    logits = model(IDS).logits
    assert (logits - base_logits).abs().max() > 1e-2  # the vectors do something
    with disable_ia3(model):
        assert_equal(model(IDS).logits, base_logits, what="switched off")
    merge_ia3(model)
    assert_close(model(IDS).logits, logits, reason="(05.4): l folded into W before the matmul", what="merged")
    with disable_ia3(model):  # unmerged on entry: the base up to the division's rounding
        assert_close(model(IDS).logits, base_logits, reason="W·l/l", what="switched off while merged")
    unmerge_ia3(model)
    for key, value in model.state_dict().items():
        key = key.replace(".base_layer", "")
        if key in original:
            assert_close(value, original[key], reason="W·l/l rounds", what=key)
    assert_equal(model(IDS).logits, model(IDS).logits)
    remove_ia3(model, merge=True)
    assert not list(ia3_layers(model))
    assert_close(model(IDS).logits, logits, reason="(05.4): l folded into W", what="removed, merged")


def test_merge_scales_rows_or_columns_in_each_layout():
    """(05.4)–(05.5): ΔW = diag(l − 1) W or W diag(l − 1), in nn.Linear's and in Conv1D's layout."""
    for model in (randomise(apply_ia3(small_gpt2())), randomise(apply_ia3(small_llama()))):
        for _, layer in ia3_layers(model):
            w = layer.base_layer.weight.detach().clone()
            w_out_in = w.T if layer.fan_in_fan_out else w
            l = layer.ia3_l.detach().flatten()
            expected = w_out_in * l if layer.is_feedforward else l[:, None] * w_out_in
            layer.merge()
            merged = layer.base_layer.weight.T if layer.fan_in_fan_out else layer.base_layer.weight
            assert_equal(merged, expected, what="diagonal ΔW")
            layer.unmerge()


def test_state_dict_round_trip():
    model = randomise(apply_ia3(small_llama()))
    fresh = load_ia3_state_dict(apply_ia3(small_llama()), ia3_state_dict(model))
    assert_equal(fresh(IDS).logits, model(IDS).logits, what="loaded")


# ---------------------------------------------------------------------------------------------------------
# PEFT's files, both ways
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tiny", "tiny-llama"])
def test_peft_loads_our_files_and_we_load_peft(tmp_path, kind):
    ours = randomise(apply_ia3(MODELS[kind]()))
    export_peft_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(MODELS[kind](), tmp_path / "ours")
    assert_close(theirs(IDS).logits, ours(IDS).logits, EXACT, reason=SAME_ORDER, what="PEFT reads ours")
    theirs.save_pretrained(tmp_path / "peft")
    again = import_peft_adapter(MODELS[kind](), tmp_path / "peft")
    assert_equal(again(IDS).logits, ours(IDS).logits, what="we read PEFT's")
    a, b = ia3_config(again), ia3_config(ours)  # PEFT keeps the lists as sets: the order may change
    assert (set(a.target_modules), set(a.feedforward_modules)) == (set(b.target_modules), set(b.feedforward_modules))


def test_exported_files_follow_peft_format(tmp_path):
    export_peft_adapter(randomise(apply_ia3(small_gpt2())), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "IA3" and config["fan_in_fan_out"] is True
    assert config["target_modules"] == ["c_attn", "mlp.c_proj"] and config["feedforward_modules"] == ["mlp.c_proj"]
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / WEIGHTS_NAME)).items()}
    assert shapes["base_model.model.transformer.h.0.attn.c_attn.ia3_l"] == (192, 1)
    assert shapes["base_model.model.transformer.h.1.mlp.c_proj.ia3_l"] == (1, 256)
    assert len(shapes) == 4


# ---------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, words", [
    (dict(target_modules=[]), ValueError, "target_modules"),
    (dict(target_modules=42), TypeError, "target_modules"),
    (dict(target_modules=["nothing"]), ValueError, "matched no module"),
    (dict(target_modules=["ln_1"]), TypeError, "nn.Linear and Conv1D"),
    (dict(target_modules=["lm_head"]), ValueError, "tied"),
    (dict(feedforward_modules=42), TypeError, "feedforward_modules"),
    (dict(feedforward_modules=["c_fc"]), ValueError, "subset of target_modules"),
    (dict(feedforward_modules="("), ValueError, "regular expression"),
])
def test_bad_arguments(kwargs, error, words):
    model = small_gpt2()
    with pytest.raises(error, match=words):
        apply_ia3(model, **kwargs)
    assert not list(ia3_layers(model)) and all(p.requires_grad for p in model.parameters())


def test_misuse_is_refused(tmp_path):
    model = apply_ia3(small_gpt2())
    with pytest.raises(ValueError, match="already carries IA3"):
        apply_ia3(model)
    with pytest.raises(ValueError, match="no IA3 layers"):
        merge_ia3(small_gpt2())
    with disable_ia3(model), pytest.raises(ValueError, match="inside `with disable_ia3"):
        merge_ia3(model)
    merge_ia3(model)
    with pytest.raises(ValueError, match="merged"):
        export_peft_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="merged"):
        load_ia3_state_dict(model, ia3_state_dict(model))
    with pytest.raises(ValueError, match="cannot train"):
        peft_lab.core.require_adapters_active(model, "train")
    unmerge_ia3(model)
    next(iter(ia3_state_dict(model).values()))[0, 0] = 0.0
    merge_ia3(model)
    with pytest.raises(ValueError, match="entry 0"):
        unmerge_ia3(model)


def test_unknown_architecture_needs_both_lists():
    model = small_gpt2()
    model.config.model_type = "unknown"
    with pytest.raises(ValueError, match="no default target_modules"):
        apply_ia3(model)
    with pytest.raises(ValueError, match="no default feedforward_modules.*\\[\\] for none"):
        apply_ia3(model, target_modules=["c_attn"])
    assert len(list(ia3_layers(apply_ia3(model, target_modules=["c_attn"], feedforward_modules=[])))) == 2


def test_peft_file_for_another_architecture(tmp_path):
    export_peft_adapter(apply_ia3(small_gpt2()), tmp_path)
    model = small_llama()
    with pytest.raises(ValueError, match="does not fit the model.*matched no module"):
        import_peft_adapter(model, tmp_path)
    assert not list(ia3_layers(model))


def test_notebook_06_harness_switches_ia3_off():
    base = small_gpt2()
    expected = base(IDS).logits
    model = randomise(apply_ia3(base))
    from peft_lab import compare
    with compare.switched_off(model):
        assert_equal(model(IDS).logits, expected, what="compare.switched_off")


def test_twelve_training_steps_equal_peft():
    ours, theirs = ia3_pair(small_llama())
    batch = lambda step: torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(step % 2))
    losses = [adamw_losses(model, 12, 3e-2, batch) for model in (ours, theirs)]
    assert losses[0][0] - losses[0][-1] > 0.01  # it did train
    assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), EXACT, reason=SAME_ORDER, what="12-step losses")
