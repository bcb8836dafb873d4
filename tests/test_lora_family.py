"""The LoRA family of notebook 08 against PEFT: PiSSA and OLoRA initialisation (init_lora_weights), and LoRA+'s
two learning rates (create_loraplus_optimizer), with the same base weights in."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer

import peft_lab
from builders import small_gpt2, small_llama
from peft_lab.lora import lora_state_dict, loraplus_optimizer
from peft_lab.tolerance import assert_close

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def _peft(base, **kw):
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **kw))


@pytest.mark.parametrize("make, init", [(small_llama, "pissa"), (small_gpt2, "pissa"), (small_llama, "olora")],
                         ids=["llama-pissa", "gpt2-pissa", "llama-olora"])
def test_init_equals_peft(make, init):
    base = make().eval()
    ours = peft_lab.apply_lora(copy.deepcopy(base), rank=4, alpha=8, init=init).eval()
    theirs = _peft(base, init_lora_weights=init).eval()
    want = peft.get_peft_model_state_dict(theirs)
    for k, v in lora_state_dict(ours).items():
        assert_close(v, want[f"base_model.model.{k}"], reason="the same decomposition, another call order",
                     what=k)
    residual = {k: v for k, v in ours.state_dict().items() if "base_layer.weight" in k}
    theirs_residual = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()
                       if "base_layer.weight" in k}
    assert residual.keys() == theirs_residual.keys()
    for k, v in residual.items():
        assert_close(v, theirs_residual[k], reason="W − s·BA from the same factors", what=k)
    with torch.no_grad():
        # the start is the base model (up to the rounding of W − s·BA + s·BA), and PEFT's model
        assert_close(ours(IDS).logits, base(IDS).logits, reason="W_res + s·BA rounds", what="start vs base")
        assert_close(ours(IDS).logits, theirs(IDS).logits, reason="another library's modules", what="logits")


def test_olora_on_gpt2_conv1d_starts_at_the_base():
    """PEFT 0.21.2's OLoRA fails on GPT-2's Conv1D (it factors the stored d_in × d_out weight); ours transposes."""
    base = small_gpt2().eval()
    ours = peft_lab.apply_lora(copy.deepcopy(base), rank=4, alpha=8, init="olora").eval()
    with torch.no_grad():
        assert_close(ours(IDS).logits, base(IDS).logits, reason="W_res + s·BA rounds", what="start vs base")
    layer = next(layer for _, layer in peft_lab.lora_layers(ours))
    q = layer.lora_B.weight
    assert_close(q.T @ q, torch.eye(4), reason="Q from QR has orthonormal columns", what="BᵀB")


def test_pissa_and_olora_refuse_what_they_cannot_do(tmp_path):
    with pytest.raises(ValueError, match="use_dora"):
        peft_lab.apply_lora(small_gpt2(), init="pissa", use_dora=True)
    with pytest.raises(ValueError, match="init must be one of"):
        peft_lab.apply_lora(small_gpt2(), init="eva")
    model = peft_lab.apply_lora(small_gpt2(), rank=2, init="pissa")
    with pytest.raises(ValueError, match="changed the base weights"):
        peft_lab.export_peft_adapter(model, tmp_path / "a")


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_plus_step_equals_peft(use_dora):
    base = small_llama()
    ours = peft_lab.apply_lora(copy.deepcopy(base), rank=4, alpha=8, use_dora=use_dora)
    theirs = _peft(base, use_dora=use_dora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, v in lora_state_dict(ours).items():  # B ≠ 0, so both factors get gradients
            v.copy_(torch.randn(v.shape, generator=g) * 0.1 + (1.0 if v.ndim == 1 else 0.0))
    peft.set_peft_model_state_dict(theirs, {f"base_model.model.{k}": v for k, v in lora_state_dict(ours).items()})
    opt_a = loraplus_optimizer(ours, lr=1e-3, ratio=16, weight_decay=0.01)
    opt_b = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                      loraplus_weight_decay=0.01)
    for model, opt in ((ours, opt_a), (theirs, opt_b)):
        for _ in range(2):
            model(input_ids=IDS, labels=IDS).loss.backward()
            opt.step()
            opt.zero_grad()
    after = peft.get_peft_model_state_dict(theirs)
    for k, v in lora_state_dict(ours).items():
        assert_close(v, after[f"base_model.model.{k}"], reason="another library's backward, 2 AdamW steps", what=k)
    # the same groups in the same order: learning rate, decay and the shapes of their parameters
    def groups(opt):
        return [(g["lr"], g["weight_decay"], sorted(tuple(p.shape) for p in g["params"])) for g in opt.param_groups]
    assert groups(opt_a) == groups(opt_b)
    assert [g["lr"] for g in opt_a.param_groups if g["params"]] == [1e-3, 16e-3]


def test_loraplus_groups_equal_peft_with_trainable_biases_and_norms():
    """Biases and LayerNorm weights made trainable beside LoRA go where PEFT puts them (B's rate, no decay)."""
    base = small_gpt2()
    ours = peft_lab.apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    theirs = _peft(base)
    for model in (ours, theirs):
        for name, p in model.named_parameters():
            if name.endswith("ln_f.weight") or name.endswith("c_proj.bias") or name.endswith("wpe.weight"):
                p.requires_grad_(True)
    opt_a = peft_lab.loraplus_optimizer(ours, lr=2e-3, ratio=8, weight_decay=0.1)
    opt_b = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=2e-3, loraplus_lr_ratio=8,
                                      loraplus_weight_decay=0.1)
    for a, b in zip(opt_a.param_groups, opt_b.param_groups, strict=True):
        assert (a["lr"], a["weight_decay"]) == (b["lr"], b["weight_decay"])
        assert sorted(tuple(p.shape) for p in a["params"]) == sorted(tuple(p.shape) for p in b["params"])
