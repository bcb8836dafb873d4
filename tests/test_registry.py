"""The method registry, the one stacking rule, and configs that check themselves.

A toy method ("scale": one learned scalar on each targeted layer's output) registers itself from this file and
nothing else; the generic operations — switching off, the stacking rule, the PEFT export's refusal, the memory
calculator's spec check — then know it.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peft_lab
from builders import small_gpt2
from peft_lab import compare, core, estimate, registry
from peft_lab.adapters import BottleneckConfig
from peft_lab.ia3 import IA3Config
from peft_lab.lora import LoRAConfig
from peft_lab.prefix import PrefixConfig

# ----------------------------------------------------------------------------------------------------------
# A toy method, in the shape of one method module
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScaleConfig:
    target_modules: tuple[str, ...] = ("c_attn",)

    def __post_init__(self):
        object.__setattr__(self, "target_modules", core.module_names(self.target_modules, "target_modules"))


class ScaleLayer(core.AdapterLayer):
    merged_fix = "nothing"

    def __init__(self, base_layer):
        super().__init__()
        self.base_layer = base_layer
        self.scale = nn.Parameter(torch.full((), 2.0))

    def adapter_tensors(self):
        return {"scale": self.scale}

    def forward(self, x):
        out = self.base_layer(x)
        return out if self.disabled else out * self.scale


_LAYERS = core.LayerMethod("scale", ScaleLayer, "scale", "scale", (nn.Linear, Conv1D))


def apply_scale(model, config=ScaleConfig()):
    registry.require_no_method(model, "scale")
    _, matched = _LAYERS.match_targets(model, config.target_modules, {})
    return _LAYERS.install(model, [(n, ScaleLayer(m)) for n, m in matched], config)


def remove_scale(model):
    return _LAYERS.remove(model, merge=None)


@contextmanager
def toy_method():
    method = registry.register(registry.Method(
        name="scale", label="scale", config_class=ScaleConfig, layer_class=ScaleLayer, apply=apply_scale,
        present=_LAYERS.present, disable=_LAYERS.disable, remove=remove_scale, state_dict=_LAYERS.state_dict,
        load_state_dict=_LAYERS.load_state_dict, config_of=_LAYERS.recorded_config,
        memory={"scale": registry.MethodShape(lowest=None, required=("targets",))}))
    try:
        yield method
    finally:
        registry.unregister("scale")


def test_a_method_that_registers_itself_is_known_everywhere(tmp_path):
    ids = torch.tensor([[1, 2, 3, 4]])
    with toy_method():
        base = small_gpt2()
        want = base(ids).logits
        model = registry.get("scale").apply(copy.deepcopy(base), ScaleConfig())
        assert registry.method_on(model).name == "scale"
        assert not torch.equal(model(ids).logits, want)
        with compare.switched_off(model):          # no isinstance chain: the registry's disable
            assert torch.equal(model(ids).logits, want)
        with pytest.raises(ValueError, match="already carries scale.*remove_scale"):
            peft_lab.apply_lora(model)             # the one stacking rule
        with pytest.raises(ValueError, match="PEFT has no format for scale"):
            peft_lab.export_peft_adapter(model, tmp_path / "out")
        spec = estimate.method_spec({"kind": "scale", "targets": ["c_attn"]})
        assert spec == {"kind": "scale", "targets": ("c_attn",)}
        with pytest.raises(ValueError, match="'tragets'"):
            estimate.method_spec({"kind": "scale", "tragets": ["c_attn"]})
        assert set(registry.get("scale").state_dict(model)) == {f"transformer.h.{i}.attn.c_attn.scale"
                                                                for i in range(2)}
    assert "scale" not in registry.methods()
    with pytest.raises(ValueError, match="kind must be one of"):
        estimate.method_spec({"kind": "scale", "targets": ["c_attn"]})


def test_registering_a_name_twice_is_refused():
    lora = registry.get("lora")
    with pytest.raises(ValueError, match="registered already"):
        registry.register(registry.Method(**{**vars(lora), "label": "another LoRA"}))


# ----------------------------------------------------------------------------------------------------------
# One method per model
# ----------------------------------------------------------------------------------------------------------

APPLY = {
    "LoRA": lambda m: peft_lab.apply_lora(m),
    "IA3": lambda m: peft_lab.apply_ia3(m),
    "bottleneck adapters": lambda m: peft_lab.apply_adapters(m, bottleneck_dim=4),
    "prefix tuning": lambda m: peft_lab.apply_prefix_tuning(m, 2),
    "prompt tuning": lambda m: peft_lab.apply_prompt_tuning(m, 2),
}


@pytest.mark.parametrize("first", list(APPLY))
@pytest.mark.parametrize("second", list(APPLY))
def test_one_method_at_a_time(first, second):
    model = APPLY[first](small_gpt2())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"already carries {first}"):
        APPLY[second](model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.label for m in registry.methods_on(model)] == [first]


def test_removing_the_first_method_allows_another():
    model = peft_lab.apply_adapters(small_gpt2(), bottleneck_dim=4)
    peft_lab.remove_adapters(model)
    peft_lab.apply_lora(model)
    assert [m.name for m in registry.methods_on(model)] == ["lora"]


def test_dispatch_reads_the_registry_not_labels():
    """served_as follows the method's registry entry; QLoRA (a quantized base) is served as trained."""
    served = {name: compare.served_as(name) for name in compare.METHODS}
    assert served == {"full FT": "as trained", "LoRA r=1": "merged", "LoRA r=8": "merged", "Houlsby": "as trained",
                      "Pfeiffer": "as trained", "prefix": "projection folded", "prompt": "as trained",
                      "IA3": "merged", "DoRA r=8": "merged", "QLoRA r=8": "as trained", "PEFT LoRA r=8": "merged",
                      "PEFT IA3": "merged"}
    assert {m.peft_type for m in registry.methods().values()} == {"LORA", "IA3", "PREFIX_TUNING",
                                                                  "PROMPT_TUNING", None}


# ----------------------------------------------------------------------------------------------------------
# Configs that check themselves
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, error, words", [
    (lambda: LoRAConfig(rank=0), ValueError, "rank"),
    (lambda: LoRAConfig(rank="8"), TypeError, "rank"),
    (lambda: LoRAConfig(alpha=-1), ValueError, "alpha"),
    (lambda: LoRAConfig(dropout=1.0), ValueError, "dropout"),
    (lambda: LoRAConfig(target_modules="c_attn("), ValueError, "regular expression"),
    (lambda: LoRAConfig(use_dora="yes"), TypeError, "use_dora"),
    (lambda: IA3Config(["c_attn"], ["c_fc"]), ValueError, "subset of target_modules"),
    (lambda: IA3Config(42), TypeError, "target_modules"),
    (lambda: BottleneckConfig(placement="middle"), ValueError, "placement"),
    (lambda: BottleneckConfig(bottleneck_dim=0), ValueError, "bottleneck_dim"),
    (lambda: BottleneckConfig(nonlinearity="softmax"), ValueError, "nonlinearity"),
    (lambda: PrefixConfig("prefix_tuning", 10, 2, 2, 8, 16, init="vocab"), ValueError, "init"),
    (lambda: PrefixConfig("prompt_tuning", 10, 2, 2, 8, 16, projection_dim=4), ValueError, "projection_dim"),
    (lambda: PrefixConfig("prompt_tuning", 10, 2, 2, 8, 16, init="text"), ValueError, "init_text"),
])
def test_configs_refuse_bad_settings(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_configs_hold_plain_python_values_and_the_keyword_call_builds_one():
    c = LoRAConfig(np.int64(4), np.float32(8.0), target_modules=["c_attn"])
    assert (type(c.rank), type(c.alpha), c.target_modules) == (int, float, ("c_attn",))
    model = peft_lab.apply_lora(small_gpt2(), rank=4, alpha=8, target_modules=["c_attn"])
    assert peft_lab.lora_config(model) == c
    same = peft_lab.apply_lora(small_gpt2(), config=c)
    assert peft_lab.lora_config(same) == c
