"""peft_lab.interop: PEFT's adapter directory written by us and loaded by PEFT, and the other way round."""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_lab
from builders import MODELS, VOCAB, small_gpt2, small_llama
from peft_lab.core import fill_seeded
from peft_lab.interop import CONFIG_NAME, WEIGHTS_NAME, export_peft_adapter, import_peft_adapter
from peft_lab.lora import apply_lora, lora_config, lora_layers, lora_state_dict
from peft_lab.tolerance import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def trained_lora(base, seed: int = 1, **kw):
    """``base`` with LoRA and random (non-zero) A and B, standing in for a trained adapter."""
    model = apply_lora(base, **kw)
    fill_seeded(lora_state_dict(model), seed, 0.05)
    return model


def peft_adapter(base, path, seed: int = 2, **config):
    """Save a PEFT LoRA adapter with random non-zero B to ``path``; return the PEFT model."""
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **config))
    fill_seeded({n: p for n, p in model.named_parameters() if "lora_" in n}, seed, 0.05)
    model.save_pretrained(path)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama", "tiny"])
def test_export_import_round_trip_is_bitwise(tmp_path, kind):
    model = trained_lora(MODELS[kind](), rank=4, alpha=8, dropout=0.1, use_rslora=True,
                         target_modules=None)
    export_peft_adapter(model, tmp_path)
    fresh = import_peft_adapter(MODELS[kind](), tmp_path)
    ours, theirs = lora_state_dict(model), lora_state_dict(fresh)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert lora_config(fresh) == lora_config(model)
    model.eval(), fresh.eval()
    assert torch.equal(model(IDS).logits, fresh(IDS).logits)


def test_exported_files_follow_peft_format(tmp_path):
    model = trained_lora(small_gpt2(), rank=4, alpha=8, target_modules=["c_attn", "c_proj"])
    export_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    assert config["target_modules"] == ["c_attn", "c_proj"] and config["fan_in_fan_out"] is True
    assert config["use_rslora"] is False and config["bias"] == "none"
    assert config["base_model_name_or_path"] == "tiny"  # built from a config: no name of its own
    keys = set(load_file(str(tmp_path / WEIGHTS_NAME)))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    assert "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 2 * 3 and not any("default" in k for k in keys)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "tiny"])
def test_peft_loads_our_export(tmp_path, kind):
    model = trained_lora(MODELS[kind](), rank=4, alpha=8).eval()
    export_peft_adapter(model, tmp_path)
    theirs = PeftModel.from_pretrained(MODELS[kind](), tmp_path).eval()
    assert_close(model(IDS).logits, theirs(IDS).logits, reason="another library's modules", what="logits")


@pytest.mark.parametrize("kind, config", [
    ("gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True)),
    ("gpt2", dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], use_rslora=True, lora_dropout=0.1,
                  fan_in_fan_out=True)),
    ("llama", dict(r=4, lora_alpha=16)),
    ("tiny", dict(r=8, lora_alpha=16, fan_in_fan_out=True)),
])
def test_we_load_peft_save_pretrained(tmp_path, kind, config):
    theirs = peft_adapter(MODELS[kind](), tmp_path, **config)
    ours = import_peft_adapter(MODELS[kind](), tmp_path).eval()
    assert_close(ours(IDS).logits, theirs(IDS).logits, reason="another library's modules", what="logits")
    assert lora_config(ours).rank == config["r"]


# ---------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def adapter_dir(tmp_path):
    export_peft_adapter(trained_lora(small_gpt2(), rank=4), tmp_path / "adapter")
    return tmp_path / "adapter"


def assert_untouched(model):
    assert not list(lora_layers(model))


def test_missing_directory_and_files(tmp_path, adapter_dir):
    model = small_gpt2()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_peft_adapter(model, tmp_path / "nowhere")
    (adapter_dir / WEIGHTS_NAME).rename(adapter_dir / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        import_peft_adapter(model, adapter_dir)
    (adapter_dir / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        import_peft_adapter(model, adapter_dir)
    assert_untouched(model)


def test_invalid_json(adapter_dir):
    (adapter_dir / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        import_peft_adapter(small_gpt2(), adapter_dir)
    (adapter_dir / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        import_peft_adapter(small_gpt2(), adapter_dir)


def test_truncated_safetensors(adapter_dir):
    file = adapter_dir / WEIGHTS_NAME
    data = file.read_bytes()
    for broken in (data[: len(data) // 2], data[:5], b"not a safetensors file at all"):
        file.write_bytes(broken)
        model = small_gpt2()
        with pytest.raises(ValueError, match="truncated or corrupt"):
            import_peft_adapter(model, adapter_dir)
        assert_untouched(model)


@pytest.mark.parametrize("change, words", [
    ({"peft_type": "LOHA"}, "unsupported peft_type 'LOHA'"),
    ({"peft_type": None}, "unsupported peft_type"),
    ({"lora_bias": True}, "lora_bias"),
    ({"bias": "all"}, "bias"),
    ({"rank_pattern": {"c_attn": 2}}, "rank_pattern"),
    ({"target_modules": "all-linear"}, "all-linear"),
    ({"r": 0}, "rank"),
])
def test_unsupported_or_invalid_config(adapter_dir, change, words):
    config = json.loads((adapter_dir / CONFIG_NAME).read_text())
    (adapter_dir / CONFIG_NAME).write_text(json.dumps({**config, **change}))
    model = small_gpt2()
    with pytest.raises(ValueError, match=words):
        import_peft_adapter(model, adapter_dir)
    assert_untouched(model)


def test_adapter_for_another_architecture(adapter_dir):
    model = small_llama()  # the GPT-2 adapter targets c_attn, which LLaMA does not have
    with pytest.raises(ValueError, match="does not fit the model.*matched no module.*q_proj"):
        import_peft_adapter(model, adapter_dir)
    assert_untouched(model)


def test_adapter_for_another_size(adapter_dir):
    model = small_gpt2(width=32)
    with pytest.raises(ValueError, match=r"shape mismatch for transformer\.h\.0\.attn\.c_attn\.lora_A\.weight: "
                                         r"the file has \(4, 64\), this model needs \(4, 32\)"):
        import_peft_adapter(model, adapter_dir)
    assert_untouched(model)


def test_import_into_a_model_that_already_has_lora(adapter_dir):
    with pytest.raises(ValueError, match="already carries LoRA"):
        import_peft_adapter(apply_lora(small_gpt2()), adapter_dir)


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="no adapter"):
        export_peft_adapter(small_gpt2(), tmp_path)
    model = trained_lora(small_gpt2())
    peft_lab.lora.merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        export_peft_adapter(model, tmp_path)
    with pytest.raises(TypeError):
        export_peft_adapter("model", tmp_path)
