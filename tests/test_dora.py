"""DoRA = ``apply_lora(..., use_dora=True)``: the equations of notebook 05 ("DoRA") and equality with PEFT's
DoRA, both ways."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_lab
from builders import MODELS, VOCAB, adamw_losses, small_gpt2, small_llama
from peft_lab.core import fill_seeded
from peft_lab.interop import CONFIG_NAME, WEIGHTS_NAME, export_peft_adapter, import_peft_adapter
from peft_lab.lora import (
    apply_lora,
    disable_lora,
    lora_config,
    lora_layers,
    lora_state_dict,
    magnitude_direction_change,
    merge_lora,
    query_weight_changes,
    remove_lora,
    unmerge_lora,
)
from peft_lab.measure import print_trainable_parameters
from peft_lab.tolerance import REORDERED, assert_close, assert_equal, is_close

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
# PEFT forms B·A by pushing an identity matrix through lora_A and lora_B, we with one matmul; it takes
# W₀x from the base output minus the bias: the same maths in another float32 order.
OTHER_ORDER = "PEFT forms BA through the layers and the norm in another order"
TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"]}


def targets_of(model):
    return TARGETS[model.config.model_type]


def peft_key(key: str) -> str:
    if key.endswith("lora_magnitude_vector"):
        return "base_model.model." + key + ".default.weight"
    return "base_model.model." + key.replace(".weight", ".default.weight")


def randomise(model, seed: int = 1):
    """A, B ~ N(0, 0.1²) and m scaled by 1 + N(0, 0.1²): away from init, so that a comparison can fail."""
    weights = lora_state_dict(model)
    fill_seeded({k: v for k, v in weights.items() if "magnitude" not in k}, seed, 0.1)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for k, v in sorted(weights.items()):
            if "magnitude" in k:
                v.mul_(1 + 0.1 * torch.randn(v.shape, generator=g))
    return model


def dora_pair(base, dropout: float = 0.0):
    """(ours, PEFT's) on two copies of ``base``: DoRA, rank 4, α 8, the same random A, B and m."""
    targets = targets_of(base)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True, target_modules=targets, task_type="CAUSAL_LM",
        fan_in_fan_out=base.config.model_type == "gpt2"))
    ours = randomise(apply_lora(base, rank=4, alpha=8, dropout=dropout, target_modules=targets, use_dora=True))
    params = dict(theirs.named_parameters())
    for key, value in lora_state_dict(ours).items():
        assert params[peft_key(key)].shape == value.shape, key
        params[peft_key(key)].data.copy_(value)
    return ours, theirs


def compare_with_peft(ours, theirs, seed: int = 0):
    """Logits and every gradient of ours against PEFT's (the same dropout masks: the same seed, the same
    order of dropout calls)."""
    torch.manual_seed(seed)
    a = ours(IDS, labels=IDS)
    torch.manual_seed(seed)
    b = theirs(IDS, labels=IDS)
    assert_close(a.logits, b.logits, reason=OTHER_ORDER, what="logits")
    a.loss.backward(), b.loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    mine = _grads(ours)
    assert set(map(peft_key, mine)) == set(grads)
    for key, grad in mine.items():
        assert_close(grad, grads[peft_key(key)], reason=OTHER_ORDER, what=key)


def _grads(model):
    out = {}
    for name, layer in lora_layers(model):
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.grad
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.grad
        out[f"{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.grad
    return out


# ---------------------------------------------------------------------------------------------------------
# Equal to PEFT
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tiny", "tiny-llama", "llama"])
def test_logits_and_gradients_match_peft(kind):
    compare_with_peft(*dora_pair(MODELS[kind]()))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_dropout_while_training_matches_peft(kind):
    """PEFT feeds dropout(x) to both extra terms of (05.10), W₀x̃ included; so do we."""
    ours, theirs = dora_pair(MODELS[kind](), dropout=0.3)
    ours.train(), theirs.train()
    compare_with_peft(ours, theirs)
    # dropout acts at all: another seed gives other logits
    torch.manual_seed(0)
    first = ours(IDS).logits
    torch.manual_seed(1)
    assert not is_close(ours(IDS).logits, first)


def test_non_detached_norm_is_caught():
    """(05.9) matters: a norm left in the graph gives A and B other gradients, and the check must see it."""
    ours, theirs = dora_pair(small_gpt2())
    for _, layer in lora_layers(ours):
        def attached(layer=layer):  # the wrong variant: n computed from B A without detaching
            delta = layer.lora_B.weight @ layer.lora_A.weight * layer.scaling
            return layer.weight_norm(delta.T if layer.fan_in_fan_out else delta)
        layer._norm = attached
    ours(IDS, labels=IDS).loss.backward()
    theirs(IDS, labels=IDS).loss.backward()
    name, layer = next(iter(lora_layers(ours)))
    expected = dict(theirs.named_parameters())[peft_key(f"{name}.lora_B.weight")].grad
    assert not is_close(layer.lora_B.weight.grad, expected)


def test_parameter_count_equals_peft_on_gpt2_small(capsys):
    base = peft_lab.build_from_config("gpt2", device="meta")
    get_peft_model(copy.deepcopy(base), LoraConfig(r=8, use_dora=True, fan_in_fan_out=True,
                                                   task_type="CAUSAL_LM")).print_trainable_parameters()
    print_trainable_parameters(apply_lora(base, rank=8, use_dora=True))
    theirs, ours = capsys.readouterr().out.strip().splitlines()
    # r (d_in + d_out) + d_out per layer: 12 · (8 · (768 + 2304) + 2304)
    assert ours == theirs and ours.startswith("trainable params: 322,560 ||")


# ---------------------------------------------------------------------------------------------------------
# The equations of notebook 05
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "tiny-llama"])
def test_init_is_exactly_the_base_and_m_is_the_norm_per_output_feature(kind):
    base = MODELS[kind]()
    expected = base(IDS).logits
    model = apply_lora(base, rank=4, target_modules=targets_of(base), use_dora=True)
    assert_equal(model(IDS).logits, expected, what="(05.8): m / n = 1")
    for _, layer in lora_layers(model):
        assert isinstance(layer, peft_lab.DoRALinear)
        w = layer.base_layer.weight
        per_output = w.norm(dim=0) if layer.fan_in_fan_out else w.norm(dim=1)  # Conv1D stores d_in × d_out
        assert layer.lora_magnitude_vector.shape == (layer.out_features,)
        assert_close(layer.lora_magnitude_vector, per_output, reason="linalg.norm vs Tensor.norm", what="m = ‖W₀‖")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))  # A, B and m


@pytest.mark.parametrize("kind", ["gpt2", "tiny-llama"])
def test_merge_unmerge_disable(kind):
    base = MODELS[kind]()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    base_logits = base(IDS).logits
    model = randomise(apply_lora(base, rank=4, alpha=8, target_modules=targets_of(base), use_dora=True))
    logits = model(IDS).logits
    assert (logits - base_logits).abs().max() > 1e-2
    with disable_lora(model):
        assert_equal(model(IDS).logits, base_logits, what="switched off")
    merge_lora(model)
    assert_close(model(IDS).logits, logits, reason="(05.11): the factor folded into W", what="merged")
    for _, layer in lora_layers(model):  # each merged output feature's weights have norm m (05.7)
        w = layer.base_layer.weight
        norms = w.norm(dim=0) if layer.fan_in_fan_out else w.norm(dim=1)
        assert_close(norms, layer.lora_magnitude_vector, reason="norm of a rescaled row", what="‖W'_i‖ = m_i")
    unmerge_lora(model)
    for key, value in model.state_dict().items():
        key = key.replace(".base_layer", "")
        if key in original:
            assert_close(value, original[key], reason="(W·f)/f − ΔW rounds", what=key)
    remove_lora(model, merge=True)
    assert_close(model(IDS).logits, logits, reason="(05.11): the factor folded into W", what="removed, merged")


def test_one_layer_is_the_decomposition():
    """(05.7): a DoRA layer computes x ↦ (m/n) ⊙ (W₀ + sBA) x + b, for Linear and for Conv1D."""
    for model in (small_gpt2(), small_llama()):
        model = randomise(apply_lora(model, rank=4, alpha=8, target_modules=targets_of(model), use_dora=True))
        name, layer = next(iter(lora_layers(model)))
        x = torch.randn(3, layer.in_features)
        w = layer.base_layer.weight.T if layer.fan_in_fan_out else layer.base_layer.weight  # d_out × d_in
        v = w + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
        expected = x @ (layer.lora_magnitude_vector[:, None] * v / v.norm(dim=1, keepdim=True)).T
        bias = layer.base_layer.bias if layer.base_layer.bias is not None else 0.0  # LLaMA has none
        assert_close(layer(x), expected + bias, reason="W' formed first", what=name)
        effective = layer.effective_weight()
        assert_close(effective.T if layer.fan_in_fan_out else effective, expected.new_tensor(
            (layer.lora_magnitude_vector[:, None] * v / v.norm(dim=1, keepdim=True)).detach()),
            reason="the norm in another order", what="effective_weight")


def test_magnitude_and_direction_change():
    """DoRA's analysis (§3): scaling a row changes its magnitude only; turning it at equal norm its direction
    only; in Conv1D's layout the same per output feature."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    scale = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    dm, dd = magnitude_direction_change(w0, scale[:, None] * w0)
    assert dd < 1e-12 and abs(dm - ((scale - 1).abs() * w0.norm(dim=1)).mean().item()) < 1e-9
    turned = torch.randn(4, 6, generator=g, dtype=torch.float64)
    turned = turned / turned.norm(dim=1, keepdim=True) * w0.norm(dim=1, keepdim=True)
    dm, dd = magnitude_direction_change(w0, turned)  # equal norms up to float64 rounding
    cos = torch.nn.functional.cosine_similarity(turned.double(), w0.double(), dim=1)
    assert dm < 1e-12 and abs(dd - (1 - cos).mean().item()) < 1e-12
    assert magnitude_direction_change(w0.T, turned.T, fan_in_fan_out=True) == magnitude_direction_change(w0, turned)


# ---------------------------------------------------------------------------------------------------------
# PEFT's files, both ways
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tiny", "tiny-llama"])
def test_peft_loads_our_files_and_we_load_peft(tmp_path, kind):
    ours = randomise(apply_lora(MODELS[kind](), rank=4, alpha=8, target_modules=targets_of(MODELS[kind]()),
                                use_dora=True))
    export_peft_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(MODELS[kind](), tmp_path / "ours")
    assert_close(theirs(IDS).logits, ours(IDS).logits, reason=OTHER_ORDER, what="PEFT reads ours")
    theirs.save_pretrained(tmp_path / "peft")
    again = import_peft_adapter(MODELS[kind](), tmp_path / "peft")
    assert lora_config(again).use_dora
    mine, back = lora_state_dict(ours), lora_state_dict(again)
    assert mine.keys() == back.keys() and all(torch.equal(mine[k], back[k]) for k in mine)
    assert_equal(again(IDS).logits, ours(IDS).logits, what="we read PEFT's file of our weights")


def test_exported_files_follow_peft_format(tmp_path):
    export_peft_adapter(apply_lora(small_gpt2(), rank=4, use_dora=True), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / WEIGHTS_NAME)).items()}
    assert shapes["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"] == (192,)
    assert len(shapes) == 2 * 3


def test_a_lora_file_marked_dora_is_refused(tmp_path):
    export_peft_adapter(apply_lora(small_gpt2(), rank=4), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "use_dora": True}))
    model = small_gpt2()
    with pytest.raises(ValueError, match="missing keys.*lora_magnitude_vector"):
        import_peft_adapter(model, tmp_path)
    assert not list(lora_layers(model))


def test_twelve_training_steps_match_peft():
    ours, theirs = dora_pair(small_gpt2())
    batch = lambda step: torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(step % 2))
    losses = [adamw_losses(model, 12, 1e-2, batch) for model in (ours, theirs)]
    assert losses[0][0] - losses[0][-1] > 0.1  # it did train
    assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), reason="another library; Adam carries rounding",
                 what="12-step loss curve")


def test_query_weight_changes_for_full_ft_lora_and_dora():
    """The per-block (ΔM, ΔD) of the query projection: zero at init for every method; a full-FT change that
    only rescales GPT-2's queries shows as magnitude alone; LoRA and DoRA read their effective weight."""
    for make in (small_gpt2, small_llama):
        base = make()
        same = query_weight_changes(copy.deepcopy(base), base)
        assert all(abs(dm) < 1e-12 and abs(dd) < 1e-12 for dm, dd in same)  # 1 − cos in float64: ~1e-16
        full = copy.deepcopy(base)
        attn = peft_lab.arch.attention(full, 1)
        with torch.no_grad():
            if hasattr(attn, "c_attn"):
                attn.c_attn.weight[:, :64] *= 1.5
                attn.c_attn.weight[:, 64:] *= 3.0  # keys and values: not part of the query analysis
            else:
                attn.q_proj.weight *= 1.5
        (m0, d0), (m1, d1) = query_weight_changes(full, base)
        q = attn.c_attn.weight[:, :64].T if hasattr(attn, "c_attn") else attn.q_proj.weight
        norm_scale = (q / 1.5).norm(dim=1).max().item()   # the base's largest query-row norm
        assert abs(m0) < 1e-12 and abs(d0) < 1e-12 and abs(d1) < 1e-12
        assert abs(m1 - (q / 1.5).norm(dim=1).mean().item() / 2) < 1e-5
        for dora in (False, True):
            model = apply_lora(copy.deepcopy(base), rank=4, use_dora=dora)
            fill_seeded({k: v for k, v in lora_state_dict(model).items() if "magnitude" not in k}, 1, 0.1)
            changes = query_weight_changes(model, base)
            assert len(changes) == 2 and all(dd > 1e-4 for _, dd in changes)
            # DoRA with m still at ‖W₀‖: every row of W' has its old norm (05.7), so only the direction moved —
            # up to float32 rounding of W' and its norm (reordered: rtol of the largest row norm); LoRA moves both
            assert all((dm <= REORDERED.rtol * norm_scale) if dora else (dm > 1e-3) for dm, _ in changes)
