"""peft_lab.adapters: equations of notebook 03, placement, save/load, errors, and equality with the committed
files AdapterHub made (data/reference/adapterhub; regenerated and checked against AdapterHub in .ci/floor)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import peft_lab
from builders import MODELS, VOCAB, small_gpt2, small_llama
from peft_lab import lora
from peft_lab.adapters import (
    BottleneckAdapter,
    ResidualTap,
    apply_adapters,
    bottleneck_config,
    bottleneck_layers,
    bottleneck_params,
    bottleneck_state_dict,
    disable_adapters,
    load_adapters,
    load_bottleneck_state_dict,
    remove_adapters,
    save_adapters,
)
from peft_lab.core import fill_seeded
from peft_lab.interop_adapterhub import export_adapterhub_adapter, import_adapterhub_adapter
from peft_lab.paths import data_dir
from peft_lab.tolerance import COMMITTED, assert_close

pytestmark = pytest.mark.usefixtures("one_thread")
PLACEMENTS = ["pfeiffer", "houlsby", "parallel"]
REFERENCE = data_dir() / "reference" / "adapterhub"


def ids(batch=2, length=12, vocab=VOCAB, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomise(model, seed=1, std=0.05):
    fill_seeded(bottleneck_state_dict(model), seed, std)
    return model


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_zero_init_is_exactly_the_base(kind, placement):
    base = MODELS[kind]()
    x = ids()
    ref = base(x).logits
    model = apply_adapters(copy.deepcopy(base), placement=placement, reduction_factor=4)
    assert torch.equal(model(x).logits, ref)
    near = apply_adapters(copy.deepcopy(base), placement=placement, reduction_factor=4, init="bert")
    assert not torch.equal(near(x).logits, ref), "bert init is near, not exactly, identity"


@pytest.mark.parametrize("placement, per_block", [("pfeiffer", 1), ("houlsby", 2), ("parallel", 1)])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_counts_are_2md_plus_m_plus_d_per_adapter(kind, placement, per_block):
    model = apply_adapters(MODELS[kind](), placement=placement, bottleneck_dim=8)
    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == layers * per_block * bottleneck_params(d, 8) == layers * per_block * (2 * 8 * d + 8 + d)
    assert all(n.split(".")[-2] in ("0", "adapter_up") for n, p in model.named_parameters() if p.requires_grad)
    assert len(list(bottleneck_layers(model))) == layers * per_block


def test_counts_on_gpt2_small_and_tiny():
    """AdapterHub's counts (verified against AdapterHub itself in tests/adapterhub)."""
    for name, expected in (("gpt2", {"pfeiffer": 894_528, "houlsby": 1_789_056}),
                           ("tiny", {"pfeiffer": 8_736, "houlsby": 17_472})):
        for placement, n in expected.items():
            model = apply_adapters(peft_lab.build_from_config(name, device="meta"), placement=placement)
            assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n


def _capture(model, x):
    """Run the base blocks with hooks: each block's input x, attention output a, x₁ and MLP output m."""
    seen = {}
    blocks = model.transformer.h
    hooks = []
    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__((i, "x"), args[0])))
        hooks.append(block.attn.register_forward_hook(lambda mod, a, o, i=i: seen.__setitem__((i, "a"), o[0])))
        hooks.append(block.ln_2.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__((i, "x1"), args[0])))
        hooks.append(block.mlp.register_forward_hook(lambda mod, a, o, i=i: seen.__setitem__((i, "m"), o)))
        hooks.append(block.register_forward_hook(lambda mod, a, o, i=i: seen.__setitem__(
            (i, "out"), o[0] if isinstance(o, tuple) else o)))
    model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_each_adapter_receives_the_tensor_it_should(placement):
    """Equation (03.3), in AdapterHub's order of additions, checked against hooks on the real blocks."""
    model = randomise(apply_adapters(small_gpt2(), placement=placement, reduction_factor=4))
    received = {}
    for name, layer in bottleneck_layers(model):
        layer.adapter_down.register_forward_pre_hook(
            lambda mod, args, name=name: received.__setitem__(name, args[0]))
    seen = _capture(model, ids())
    for i, block in enumerate(model.transformer.h):
        x, x1, out = seen[(i, "x")], seen[(i, "x1")], seen[(i, "out")]
        if placement == "houlsby":
            f_a = block.attn.bottleneck
            a = received[f"transformer.h.{i}.attn"]
            assert torch.equal(x1, (f_a(a) + a) + x)
            m = received[f"transformer.h.{i}.mlp"]
            assert torch.equal(out, (block.mlp.bottleneck(m) + m) + x1)
        else:
            m = block.mlp.base_layer(block.ln_2.base_layer(x1))  # the MLP output alone, recomputed
            h = received[f"transformer.h.{i}.mlp"]
            if placement == "pfeiffer":
                assert torch.equal(h, m + x1)          # f reads the block's usual output z
            else:
                assert torch.equal(h, x1)              # f reads the MLP's input stream
            assert torch.equal(out, (block.mlp.bottleneck(h) + m) + x1)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_disable_and_remove_give_the_base_back_exactly(kind, placement):
    base = MODELS[kind]()
    before = state(base)
    x = ids()
    ref = base(x).logits
    model = randomise(apply_adapters(copy.deepcopy(base), placement=placement, reduction_factor=4))
    assert not torch.equal(model(x).logits, ref)
    with disable_adapters(model):
        assert torch.equal(model(x).logits, ref)
    assert not torch.equal(model(x).logits, ref), "enabled again after the block"
    remove_adapters(model)
    assert not any(isinstance(m, (BottleneckAdapter, ResidualTap)) for m in model.modules())
    assert torch.equal(model(x).logits, ref)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_only_adapters_train(placement):
    model = apply_adapters(small_gpt2(), placement=placement, reduction_factor=4, init="bert")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "adapter_" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    for _ in range(2):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in frozen.items())


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_save_load_bitwise(kind, placement, tmp_path):
    base = MODELS[kind]()
    model = randomise(apply_adapters(copy.deepcopy(base), placement=placement, reduction_factor=4,
                                     nonlinearity="gelu"))
    path = save_adapters(model, tmp_path / "a.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"], "no temporary files left behind"
    loaded = load_adapters(copy.deepcopy(base), path)
    assert bottleneck_config(loaded) == bottleneck_config(model)
    a, b = bottleneck_state_dict(model), bottleneck_state_dict(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = ids()
    assert torch.equal(model(x).logits, loaded(x).logits)


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_equal_to_the_committed_adapterhub_reference(placement):
    """AdapterHub's own saved adapter, imported here, gives AdapterHub's logits (made by
    `python -m peft_lab.reference_adapterhub` in the floor environment)."""
    ref = load_file(str(REFERENCE / placement / "logits.safetensors"))
    model = import_adapterhub_adapter(peft_lab.load_base_model("tiny", device="cpu")[0], REFERENCE / placement)
    assert bottleneck_config(model).placement == placement
    assert_close(model(ref["input_ids"]).logits, ref["logits"], COMMITTED, what="logits",
                 reason="AdapterHub's logits were computed on another machine (the floor env compares live)")


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby", "parallel"])
def test_adapterhub_format_round_trip(placement, tmp_path):
    model = randomise(apply_adapters(small_gpt2(), placement=placement, reduction_factor=4))
    export_adapterhub_adapter(model, tmp_path, "task")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["name"] == "task" and meta["hidden_size"] == 64 and meta["config"]["reduction_factor"] == 4
    keys = load_file(str(tmp_path / "adapter.safetensors")).keys()
    assert "transformer.h.0.output_adapters.adapters.task.adapter_down.0.weight" in keys
    assert ("transformer.h.1.attention_adapters.adapters.task.adapter_up.bias" in keys) == (placement == "houlsby")
    back = import_adapterhub_adapter(small_gpt2(), tmp_path)
    x = ids()
    assert torch.equal(back(x).logits, model(x).logits)


# ---------------------------------------------------------------------------------------------------------
# Bad input: each error names the argument, the value and the fix
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(reduction_factor=3), ValueError, r"reduction_factor must divide the width d = 64.*got 3.*bottleneck_dim"),
    (dict(reduction_factor=0), ValueError, r"reduction_factor must be a number > 0, got 0"),
    (dict(reduction_factor=128), ValueError, r"reduction_factor must divide.*whole number ≥ 1, got 128"),
    (dict(reduction_factor="16"), TypeError, r"reduction_factor must be a number, got '16'.*without quotes"),
    (dict(bottleneck_dim=0), ValueError, r"bottleneck_dim must be an integer >= 1, got 0"),
    (dict(bottleneck_dim=-4), ValueError, r"bottleneck_dim must be an integer >= 1, got -4"),
    (dict(bottleneck_dim=2.5), TypeError, r"bottleneck_dim must be an integer, got 2.5"),
    (dict(placement="sequential"), ValueError,
     r"placement must be one of \['houlsby', 'parallel', 'pfeiffer'\], got 'sequential'"),
    (dict(nonlinearity="softmax"), ValueError, r"nonlinearity must be one of .*relu.*, got 'softmax'"),
    (dict(init="normal"), ValueError, r"init must be one of \['zero', 'bert', 'houlsby'\], got 'normal'"),
    (dict(init="zeros"), ValueError, r"init must be one of \['zero', .*got 'zeros'"),
    (dict(scaling=-1.0), ValueError, r"scaling must be a number > 0, got -1.0"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        apply_adapters(small_gpt2(), **kwargs)


def test_bad_models():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        apply_adapters("gpt2")
    model = apply_adapters(small_gpt2())
    with pytest.raises(ValueError, match="already carries bottleneck adapters.*remove_adapters"):
        apply_adapters(model)
    with_lora = lora.apply_lora(small_gpt2(), rank=2)
    with pytest.raises(ValueError, match="already carries LoRA.*remove_lora"):
        apply_adapters(with_lora)
    with pytest.raises(ValueError, match="no bottleneck adapter layers"):
        bottleneck_state_dict(small_gpt2())
    bert_like = small_gpt2()
    bert_like.config.model_type = "bert"
    with pytest.raises(ValueError, match="model type 'bert'.*peft_lab.arch.LAYOUTS"):
        apply_adapters(bert_like)


def test_strict_loading(tmp_path):
    model = apply_adapters(small_gpt2(), reduction_factor=4)
    sd = bottleneck_state_dict(model)
    with pytest.raises(ValueError, match="missing keys"):
        load_bottleneck_state_dict(model, dict(list(sd.items())[1:]))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_bottleneck_state_dict(model, {k: torch.zeros(3) for k in sd})
    path = save_adapters(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="width 64, this model has width 32"):
        load_adapters(small_gpt2(width=32), path)
    with pytest.raises(FileNotFoundError, match="path="):
        load_adapters(small_gpt2(), tmp_path / "missing.safetensors")


def _exported(tmp_path, placement="pfeiffer", width=64):
    export_adapterhub_adapter(apply_adapters(small_gpt2(width), placement=placement, reduction_factor=4),
                              tmp_path, "task")
    return json.loads((tmp_path / "adapter_config.json").read_text())


@pytest.mark.parametrize("field, value", [("use_gating", True), ("ln_after", True), ("phm_layer", True),
                                          ("dropout", 0.1), ("leave_out", [0])])
def test_adapterhub_flags_we_do_not_implement_are_named(tmp_path, field, value):
    meta = _exported(tmp_path)
    meta["config"][field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    model = small_gpt2()
    with pytest.raises(ValueError, match=field):
        import_adapterhub_adapter(model, tmp_path)
    assert not any(True for _ in bottleneck_layers(model)), "a refused import leaves the model as it came"


def test_adapterhub_import_refuses_other_models_and_pickles(tmp_path):
    _exported(tmp_path)
    with pytest.raises(ValueError, match="hidden_size=64.*32"):
        import_adapterhub_adapter(small_gpt2(width=32), tmp_path)
    with pytest.raises(ValueError, match="model type 'llama'"):
        import_adapterhub_adapter(small_llama(), tmp_path)
    (tmp_path / "adapter.safetensors").unlink()
    (tmp_path / "pytorch_adapter.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"pickle.*save_adapter\(dir, name, with_head=False, use_safetensors=True\)"):
        import_adapterhub_adapter(small_gpt2(), tmp_path)
    with pytest.raises(FileNotFoundError, match="path="):
        import_adapterhub_adapter(small_gpt2(), tmp_path / "nothing")
    with pytest.raises(ValueError, match="name must be"):
        export_adapterhub_adapter(apply_adapters(small_gpt2()), tmp_path / "x", "bad name")
