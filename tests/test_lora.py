"""peft_lab.lora: equations of notebook 02, and equivalence with PEFT's LoRA (weights copied one to one)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.pytorch_utils import Conv1D

import peft_lab
from builders import MODELS, VOCAB, adamw_losses, small_gpt2, small_llama
from peft_lab.arch import DEFAULT_TARGETS
from peft_lab.core import fill_seeded, matches_target
from peft_lab.lora import (
    LoRALinear,
    apply_lora,
    disable_lora,
    load_lora_state_dict,
    lora_config,
    lora_layers,
    lora_state_dict,
    merge_lora,
    remove_lora,
    unmerge_lora,
)
from peft_lab.measure import print_trainable_parameters
from peft_lab.tolerance import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(kind: str):
    return MODELS[kind]()


def randomise_lora(model, seed: int = 1, std: float = 0.02):
    """Give B (and A) fresh random values, so the LoRA branch is not the trivial zero of init."""
    fill_seeded(lora_state_dict(model), seed, std)


def copy_into_peft(ours, peft_model):
    """Copy our A and B into a PEFT model: same shapes, same orientation, only the key names differ."""
    params = dict(peft_model.named_parameters())
    for key, value in lora_state_dict(ours).items():
        peft_key = "base_model.model." + key.replace(".weight", ".default.weight")
        assert params[peft_key].shape == value.shape, key
        params[peft_key].data.copy_(value)


def lora_pair(base, **kw):
    """(ours, peft) from two copies of ``base`` with the same settings and the same (random) A, B."""
    peft_kw = dict(r=kw.get("rank", 8), lora_alpha=kw.get("alpha", 16), lora_dropout=kw.get("dropout", 0.0),
                   target_modules=kw.get("target_modules"), use_rslora=kw.get("use_rslora", False),
                   fan_in_fan_out=base.config.model_type == "gpt2", task_type="CAUSAL_LM")
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(**peft_kw))
    ours = apply_lora(base, **kw)
    randomise_lora(ours)
    copy_into_peft(ours, theirs)
    return ours, theirs


def input_ids(batch=2, length=16, vocab=VOCAB, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_forward_backward(ours, theirs, ids):
    out_a = ours(ids, labels=ids)
    out_b = theirs(ids, labels=ids)
    diff = assert_close(out_a.logits, out_b.logits, reason="another library's modules", what="logits")
    out_a.loss.backward()
    out_b.loss.backward()
    grads_b = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for key, _ in lora_state_dict(ours).items():
        layer_name, ab, _w = key.rsplit(".", 2)
        g_a = getattr(ours.get_submodule(layer_name), ab).weight.grad
        g_b = grads_b["base_model.model." + key.replace(".weight", ".default.weight")]
        assert_close(g_a, g_b, reason="another library's backward", what=key)
    return diff


# ---------------------------------------------------------------------------------------------------------
# Equivalence with PEFT
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama", "tiny"])
def test_logits_and_gradients_match_peft(kind):
    base = make_model(kind)
    ours, theirs = lora_pair(base, rank=4, alpha=8)
    assert_same_forward_backward(ours, theirs, input_ids(vocab=base.config.vocab_size))


def test_rslora_and_dropout_settings_match_peft():
    ours, theirs = lora_pair(small_gpt2(), rank=16, alpha=8, use_rslora=True, target_modules=["c_attn", "c_fc"])
    assert all(layer.scaling == 8 / math.sqrt(16) for _, layer in lora_layers(ours))
    assert_same_forward_backward(ours, theirs, input_ids())


def test_gpt2_small_architecture_matches_peft():
    # 124M parameters: instead of a second copy, run PEFT first, unload it (the base layers come back
    # untouched), then apply ours to the same base model.
    base = peft_lab.build_from_config("gpt2", device="cpu")
    ids = input_ids(2, 16, vocab=base.config.vocab_size)
    theirs = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, fan_in_fan_out=True, task_type="CAUSAL_LM"))
    fill_seeded({n: p for n, p in theirs.named_parameters() if p.requires_grad}, 1, 0.02)
    out = theirs(ids, labels=ids)
    out.loss.backward()
    peft_lora = {n.removeprefix("base_model.model.").replace(".default", ""): (p.detach().clone(), p.grad)
                 for n, p in theirs.named_parameters() if p.requires_grad}
    ours = apply_lora(theirs.unload(), rank=8, alpha=16)
    load_lora_state_dict(ours, {k: w for k, (w, _) in peft_lora.items()})
    mine = ours(ids, labels=ids)
    assert_close(mine.logits, out.logits, reason="another library's modules", what="gpt2 logits")
    mine.loss.backward()
    for name, layer in lora_layers(ours):
        for ab in ("lora_A", "lora_B"):
            grad = getattr(layer, ab).weight.grad
            assert_close(grad, peft_lora[f"{name}.{ab}.weight"][1], reason="another library's backward", what=name)


@pytest.mark.parametrize("targets, trainable", [(["c_attn"], 294_912), (["c_attn", "c_proj"], 811_008)])
def test_trainable_parameter_line_matches_peft_on_gpt2_small(capsys, targets, trainable):
    base = peft_lab.build_from_config("gpt2", device="meta")  # counting needs shapes only
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=targets, fan_in_fan_out=True,
                                                         task_type="CAUSAL_LM"))
    theirs.print_trainable_parameters()
    ours = apply_lora(base, rank=8, target_modules=targets)
    print_trainable_parameters(ours)
    peft_line, our_line = capsys.readouterr().out.strip().splitlines()
    assert our_line == peft_line
    assert our_line.startswith(f"trainable params: {trainable:,d} ||")
    # the suffix rule: "c_proj" wraps attn.c_proj and mlp.c_proj, exactly the modules PEFT wraps
    peft_wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")
                    and hasattr(m, "base_layer")}
    assert {n for n, _ in lora_layers(ours)} == peft_wrapped


@pytest.mark.parametrize("kind", ["gpt2", "tiny"])
def test_twenty_training_steps_match_peft(kind):
    base = make_model(kind)
    ours, theirs = lora_pair(base, rank=4, alpha=8)
    vocab = base.config.vocab_size
    losses = [adamw_losses(model.train(), 20, 1e-2, lambda step: input_ids(4, 16, vocab=vocab, seed=step))
              for model in (ours, theirs)]
    assert losses[0][0] != losses[0][-1]  # it did train
    assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), reason="another library; Adam carries rounding",
                 what="20-step loss curve")


def test_default_targets_agree_with_peft():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults
    for model_type, targets in DEFAULT_TARGETS["lora"].items():
        assert sorted(peft_defaults[model_type]) == sorted(targets), model_type
    assert lora_config(apply_lora(small_llama())).target_modules == ("q_proj", "v_proj")
    assert lora_config(apply_lora(small_gpt2())).target_modules == ("c_attn",)


# ---------------------------------------------------------------------------------------------------------
# The equations of notebook 02
# ---------------------------------------------------------------------------------------------------------

def test_init_is_the_identity_and_base_is_frozen():
    base = small_gpt2()
    ids = input_ids()
    expected = base(ids).logits
    model = apply_lora(base, rank=8, alpha=16)
    assert torch.equal(model(ids).logits, expected)  # (02.3): B = 0 ⇒ h = W x exactly
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, Conv1D) and layer.fan_in_fan_out
    assert layer.lora_A.weight.shape == (8, 64) and layer.lora_B.weight.shape == (3 * 64, 8)
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and layer.lora_A.weight.abs().sum() > 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5) on fan_in = d_in gives U(−1/√d_in, 1/√d_in)
    assert layer.lora_A.weight.abs().max() <= bound
    assert layer.scaling == 2.0
    # (02.5) r (d_in + d_out) per layer
    assert sum(t.numel() for t in lora_state_dict(model).values()) == 2 * 8 * (64 + 3 * 64)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_merge_unmerge_disable(kind):
    base = make_model(kind)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    ids = input_ids()
    base_logits = base(ids).logits
    model = apply_lora(base, rank=4, alpha=8)
    randomise_lora(model, std=0.1)
    lora_logits = model(ids).logits
    assert (lora_logits - base_logits).abs().max() > 1e-3  # the adapter does something

    with disable_lora(model):
        assert torch.equal(model(ids).logits, base_logits)  # exact: the LoRA branch is skipped
    assert torch.equal(model(ids).logits, lora_logits)

    merge_lora(model)
    merged = "W + s·BA computed once vs W x + s·B(A x)"
    assert_close(model(ids).logits, lora_logits, reason=merged, what="merged logits")
    with disable_lora(model):  # merged layers are unmerged inside and merged again after
        assert_close(model(ids).logits, base_logits, reason="W + Δ − Δ rounds", what="unmerged inside disable")
    assert all(layer.merged for _, layer in lora_layers(model))

    unmerge_lora(model)
    for name, layer in lora_layers(model):
        w0 = original[f"{name}.weight"]
        assert_close(layer.base_layer.weight, w0, reason="W + Δ − Δ rounds", what=f"{name} unmerged")
    assert_close(model(ids).logits, lora_logits, reason=merged, what="unmerged logits")


def test_merge_equals_delta_weight_in_base_layout():
    for layer in (Conv1D(12, 6), torch.nn.Linear(6, 12)):  # both map 6 → 12 features
        w0 = layer.weight.detach().clone()
        lora = LoRALinear(layer, rank=2, alpha=4)
        torch.nn.init.normal_(lora.lora_B.weight)
        x = torch.randn(3, 6)
        unmerged = lora(x)
        expected = unmerged - layer(x).detach()  # the LoRA branch alone
        delta = lora.lora_B.weight @ lora.lora_A.weight * 2.0
        assert_close(expected, x @ delta.T, reason="(Wx + sBAx) − Wx vs x(sBA)ᵀ", what="branch")
        lora.merge()
        assert_close(lora.base_layer.weight, w0 + (delta.T if lora.fan_in_fan_out else delta),
                     reason="B @ A * s in another order", what="merged weight")
        assert_close(lora(x), unmerged, reason="merged vs unmerged", what="output")


def test_rslora_scaling():
    layer = LoRALinear(torch.nn.Linear(8, 8), rank=4, alpha=16, use_rslora=True)
    assert layer.scaling == 16 / 2
    assert LoRALinear(torch.nn.Linear(8, 8), rank=4, alpha=16).scaling == 4
    assert peft_lab.lora.lora_scaling(64, 16, use_rslora=True) == 2.0


def test_dropout_only_on_the_lora_branch():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 8), rank=4, alpha=4, dropout=0.5)
    x = torch.randn(5, 16)
    base_out = layer.base_layer(x)
    layer.train()
    assert torch.equal(layer(x), base_out)  # B = 0: dropout never touches the base path
    torch.nn.init.normal_(layer.lora_B.weight)
    torch.manual_seed(1)
    got = layer(x)
    torch.manual_seed(1)
    kept = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True) != 0  # the same draw: the mask
    delta = layer.scaling * layer.lora_B.weight @ layer.lora_A.weight             # ΔW = s·BA (02.1)
    # the base path undropped, the branch fed the kept inputs scaled by 1/(1−p) = 2 (PEFT's placement)
    assert_close(got - base_out, (x * kept * 2) @ delta.T, reason="Wx + sB(Ax̃) − Wx vs x̃(sBA)ᵀ", what="branch")
    assert not torch.allclose(got - base_out, x @ delta.T, atol=1e-3)             # dropout did act on it
    layer.eval()
    assert_close(layer(x) - base_out, x @ delta.T, reason="Wx + sB(Ax) − Wx vs x(sBA)ᵀ", what="eval branch")


def test_state_dict_round_trip_and_remove():
    model = apply_lora(small_gpt2(), rank=4, target_modules=["c_attn", "mlp.c_proj"])
    randomise_lora(model)
    sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in sd) and len(sd) == 2 * 2 * 2
    fresh = apply_lora(small_gpt2(), rank=4, target_modules=["c_attn", "mlp.c_proj"])
    load_lora_state_dict(fresh, sd)
    assert all(torch.equal(fresh_v, sd[k]) for k, fresh_v in lora_state_dict(fresh).items())
    ids = input_ids()
    lora_logits = model(ids).logits
    remove_lora(model, merge=True)
    assert not list(lora_layers(model)) and isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    assert_close(model(ids).logits, lora_logits, reason="merged vs unmerged", what="logits after remove")
    assert apply_lora(model, rank=2) is model  # LoRA can be applied again after removal


def test_matching_rule():
    assert matches_target("transformer.h.0.attn.c_attn", ["c_attn"])
    assert matches_target("transformer.h.0.mlp.c_proj", ["c_proj"])
    assert not matches_target("transformer.h.0.mlp.c_proj", ["attn.c_proj"])
    assert not matches_target("transformer.h.0.attn.c_attn", ["attn"])  # whole name parts only
    assert matches_target("transformer.h.1.attn.c_attn", r".*\.h\.1\.attn\.c_attn")
    model = apply_lora(small_gpt2(), target_modules=r".*\.h\.1\.attn\.c_attn")
    assert [n for n, _ in lora_layers(model)] == ["transformer.h.1.attn.c_attn"]


def test_half_precision_base_gets_float32_adapter():
    model = apply_lora(small_gpt2().to(torch.bfloat16), rank=4)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_A.weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    randomise_lora(model, std=0.05)
    ids = input_ids()
    out = model(ids).logits
    assert out.dtype == torch.bfloat16
    with disable_lora(model):
        effect = (model(ids).logits.float() - out.float()).abs().max()  # what the update changes
    merge_lora(model)
    assert layer.base_layer.weight.dtype == torch.bfloat16
    # bf16 rounding of the merged W is a few bf16 ulps (~0.004 here) against an effect of ~0.3: a merge that
    # dropped the update would be off by the whole effect
    assert (model(ids).logits.float() - out.float()).abs().max() < 0.1 * effect


def test_meta_device_counts():
    model = apply_lora(peft_lab.build_from_config("llama-7b", device="meta"), rank=8)
    # 32 layers × (q_proj + v_proj) × r (d_in + d_out), equation (02.5)
    assert peft_lab.count_parameters(model)[0] == 32 * 2 * 8 * (4096 + 4096)


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, words", [
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=-2), ValueError, "rank"),
    (dict(rank=2.5), TypeError, "rank"),
    (dict(rank=True), TypeError, "rank"),
    (dict(alpha=0), ValueError, "alpha"),
    (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(dropout=-0.1), ValueError, "dropout"),
    (dict(target_modules=[]), ValueError, "target_modules"),
    (dict(target_modules=42), TypeError, "target_modules"),
    (dict(use_rslora="yes"), TypeError, "use_rslora"),
])
def test_bad_hyperparameters(kwargs, error, words):
    model = small_gpt2()
    with pytest.raises(error, match=words):
        apply_lora(model, **kwargs)
    assert not list(lora_layers(model))  # nothing was changed


def test_target_matching_nothing_lists_candidates():
    model = small_gpt2()
    with pytest.raises(ValueError, match="matched no module") as info:
        apply_lora(model, target_modules=["q_proj"])
    for name in ("c_attn", "c_proj", "c_fc", "lm_head"):
        assert name in str(info.value)


def test_target_that_is_not_linear():
    model = small_gpt2()
    with pytest.raises(TypeError, match="Embedding"):
        apply_lora(model, target_modules=["wte"])
    with pytest.raises(TypeError, match="GPT2Attention"):
        apply_lora(model, target_modules=["attn"])
    assert not list(lora_layers(model)) and all(p.requires_grad for p in model.parameters())


def test_applying_twice_and_operations_without_lora():
    model = apply_lora(small_gpt2())
    with pytest.raises(ValueError, match="already carries LoRA"):
        apply_lora(model)
    plain = small_gpt2()
    for fn in (merge_lora, unmerge_lora, lora_state_dict, remove_lora):
        with pytest.raises(ValueError, match="no LoRA layers"):
            fn(plain)
    with pytest.raises(ValueError, match="no LoRA layers"):
        with disable_lora(plain):
            pass
    with pytest.raises(TypeError):
        apply_lora("gpt2")


def test_unknown_architecture_without_targets():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no default target_modules"):
        apply_lora(net)
    apply_lora(net, rank=2, target_modules=["0", "2"])  # plain nn.Sequential works with explicit names
    assert len(list(lora_layers(net))) == 2


def test_load_state_dict_errors():
    model = apply_lora(small_gpt2(), rank=4)
    sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
    key = "transformer.h.0.attn.c_attn.lora_A.weight"
    shape_error = r"shape mismatch for transformer\.h\.0\.attn\.c_attn\.lora_A\.weight.*\(8, 64\).*\(4, 64\)"
    with pytest.raises(ValueError, match=shape_error):
        load_lora_state_dict(model, {**sd, key: torch.zeros(8, 64)})
    with pytest.raises(ValueError, match="missing keys"):
        load_lora_state_dict(model, {k: v for k, v in sd.items() if k != key})
