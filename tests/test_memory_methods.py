"""The analytic memory of a training step with a PEFT method (estimate_memory's ``method``, notebook 06)
against the tensor accounting of measure_memory: equal to the byte for every method of the course on GPT-2
and on LLaMA with grouped-query attention."""
import copy

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

import peft_lab
from peft_lab.arch import default_targets
from peft_lab.estimate import activation_elements, estimate_memory
from peft_lab.measure import measure_memory
from peft_lab.prefix import apply_prefix_tuning, apply_prompt_tuning

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "gpt2": GPT2Config(vocab_size=500, n_positions=128, n_embd=96, n_layer=3, n_head=4, resid_pdrop=0.0,
                       embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
    # grouped-query attention: 2 key/value heads for 4 query heads
    "llama-gqa": LlamaConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=300, max_position_embeddings=128,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0),
}
B, T = 3, 20


def _lora_targets(cfg):
    return default_targets(cfg, "lora")


METHODS = {
    "full": lambda cfg: ({"kind": "full"}, lambda m: m),
    "lora": lambda cfg: ({"kind": "lora", "rank": 8, "targets": _lora_targets(cfg)},
                         lambda m: peft_lab.apply_lora(m, rank=8, target_modules=_lora_targets(cfg))),
    "lora-attn-mlp": lambda cfg: (
        {"kind": "lora", "rank": 4, "targets": ["c_attn", "c_proj"] if cfg.model_type == "gpt2"
         else ["q_proj", "o_proj", "down_proj"]},
        lambda m: peft_lab.apply_lora(m, rank=4, target_modules=["c_attn", "c_proj"] if cfg.model_type == "gpt2"
                                      else ["q_proj", "o_proj", "down_proj"])),
    "lora-up": lambda cfg: (  # LLaMA: up_proj trained, gate_proj not: layer 0 keeps SiLU(gate) only
        {"kind": "lora", "rank": 4, "targets": ["c_fc"] if cfg.model_type == "gpt2" else ["up_proj"]},
        lambda m: peft_lab.apply_lora(m, rank=4, target_modules=["c_fc"] if cfg.model_type == "gpt2" else ["up_proj"])),
    "dora": lambda cfg: ({"kind": "lora", "rank": 8, "targets": _lora_targets(cfg), "use_dora": True},
                         lambda m: peft_lab.apply_lora(m, rank=8, target_modules=_lora_targets(cfg), use_dora=True)),
    "dora-attn-mlp": lambda cfg: (  # a DoRA layer above the lowest one keeps m/n − 1 in layer 0 too
        {"kind": "lora", "rank": 4, "use_dora": True, "targets": ["c_attn", "c_fc"] if cfg.model_type == "gpt2"
         else ["k_proj", "o_proj", "up_proj"]},
        lambda m: peft_lab.apply_lora(m, rank=4, use_dora=True, target_modules=["c_attn", "c_fc"]
                                      if cfg.model_type == "gpt2" else ["k_proj", "o_proj", "up_proj"])),
    "ia3": lambda cfg: ({"kind": "ia3", "targets": default_targets(cfg, "ia3"),
                         "feedforward": default_targets(cfg, "ia3_feedforward")}, peft_lab.apply_ia3),
    "ia3-mlp": lambda cfg: (  # lowest target in the MLP: layer 0 keeps nothing below it
        {"kind": "ia3", "targets": ["c_fc", "mlp.c_proj"] if cfg.model_type == "gpt2" else ["up_proj", "down_proj"],
         "feedforward": ["mlp.c_proj"] if cfg.model_type == "gpt2" else ["down_proj"]},
        lambda m: peft_lab.apply_ia3(m, target_modules=["c_fc", "mlp.c_proj"] if cfg.model_type == "gpt2"
                                     else ["up_proj", "down_proj"])),
    "pfeiffer": lambda cfg: ({"kind": "pfeiffer", "bottleneck_dim": 8},
                             lambda m: peft_lab.apply_adapters(m, "pfeiffer", bottleneck_dim=8)),
    "houlsby": lambda cfg: ({"kind": "houlsby", "bottleneck_dim": 8},
                            lambda m: peft_lab.apply_adapters(m, "houlsby", bottleneck_dim=8)),
    "parallel": lambda cfg: ({"kind": "parallel", "bottleneck_dim": 8},
                             lambda m: peft_lab.apply_adapters(m, "parallel", bottleneck_dim=8)),
    "prefix": lambda cfg: ({"kind": "prefix", "num_virtual_tokens": 5},
                           lambda m: apply_prefix_tuning(m, num_virtual_tokens=5)),
    "prefix-projection": lambda cfg: ({"kind": "prefix", "num_virtual_tokens": 5, "projection_dim": 16},
                                      lambda m: apply_prefix_tuning(m, num_virtual_tokens=5, projection_dim=16)),
    "prompt": lambda cfg: ({"kind": "prompt", "num_virtual_tokens": 5},
                           lambda m: apply_prompt_tuning(m, num_virtual_tokens=5)),
}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_estimate_equals_measurement(arch, method):
    """Byte for byte. The calculator counts what autograd saves on CPU, which depends on torch's CPU kernels
    (scaled dot-product attention above all): calibrated on torch 2.9.0 (the declared floor, in the floor
    environment) and 2.14.1 (the newest release when written). A new torch can turn this red with no bug in
    peft_lab: then re-measure the saved tensors (measure_memory's breakdown) and update the calculator."""
    cfg = CONFIGS[arch]
    spec, apply = METHODS[method](cfg)
    model = apply(copy.deepcopy(peft_lab.build_from_config(cfg, device="cpu")))
    batch = {"input_ids": torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(0))}
    measured = measure_memory(model, batch)
    trainable, _ = peft_lab.count_parameters(model)
    estimated = estimate_memory(cfg, trainable_params=None if method == "full" else trainable, batch_size=B,
                                seq_len=T, method=spec)
    assert estimated == measured, (
        f"calculator ≠ measurement on torch {torch.__version__} (measured, calculated): "
        f"{ {k: (measured[k], estimated[k]) for k in measured} }. If only this torch differs, re-measure the "
        "saved tensors for this torch and update peft_lab.estimate")


def test_full_method_is_the_notebook_00_formula():
    for cfg in CONFIGS.values():
        assert activation_elements(cfg, 2, 16, {"kind": "full"}) == activation_elements(cfg, 2, 16)


def test_peft_saves_less_than_full_and_lora_grows_with_rank():
    cfg = CONFIGS["gpt2"]
    full = activation_elements(cfg, 2, 16)[0]
    r1 = activation_elements(cfg, 2, 16, {"kind": "lora", "rank": 1, "targets": ["c_attn"]})[0]
    r8 = activation_elements(cfg, 2, 16, {"kind": "lora", "rank": 8, "targets": ["c_attn"]})[0]
    assert r1 < r8 < full


def test_method_errors():
    cfg = CONFIGS["gpt2"]
    with pytest.raises(ValueError, match="kind"):
        activation_elements(cfg, 1, 8, {"kind": "dora"})
    with pytest.raises(ValueError, match="targets"):
        activation_elements(cfg, 1, 8, {"kind": "lora", "rank": 8, "targets": ["q_proj"]})
    with pytest.raises(ValueError, match="trainable_params"):
        estimate_memory(cfg, batch_size=1, seq_len=8, method={"kind": "lora", "rank": 8, "targets": ["c_attn"]})
    with pytest.raises(ValueError, match="4bit"):
        estimate_memory(cfg, batch_size=1, seq_len=8, precision="4bit-base")


def test_four_bit_base_arithmetic():
    """NF4 with double quantization (Dettmers et al. 2023, §3), derived from its block sizes: 4 bits per weight,
    an 8-bit constant per block of 64, an fp32 constant per 256 blocks; the method's own weights as in
    bf16-mixed (2 B + a 4 B master copy)."""
    n = peft_lab.count_parameters(peft_lab.build_from_config("gpt2"))[1]
    spec = {"kind": "lora", "rank": 8, "targets": ["c_attn"]}
    q = estimate_memory("gpt2", trainable_params=294_912, batch_size=0, precision="4bit-base", method=spec)
    bits = 4 + 8 / 64 + 32 / (64 * 256)
    assert q["parameters"] == pytest.approx(bits / 8 * n + (2 + 4) * 294_912, rel=1e-4)
    assert q["gradients"] == 2 * 294_912 and q["optimizer"] == 8 * 294_912


def test_a_config_with_dropout_is_refused_not_under_estimated():
    """GPT-2 from the hub trains with dropout 0.1: autograd then keeps more than the formula counts (measured
    here), so the calculator refuses such a config instead of under-estimating it."""
    cfg = copy.deepcopy(CONFIGS["gpt2"])
    cfg.attn_pdrop = cfg.resid_pdrop = cfg.embd_pdrop = 0.1
    model = peft_lab.build_from_config(cfg, device="cpu")
    model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.1
    for module in model.modules():  # build_from_config switches dropout off; switch it back on
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    batch = {"input_ids": torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(0))}
    with_dropout = measure_memory(model, batch)["activations"]
    assert with_dropout > estimate_memory(CONFIGS["gpt2"], batch_size=B, seq_len=T)["activations"]
    with pytest.raises(ValueError, match="dropout.*attn_pdrop=0.1.*measure_memory"):
        estimate_memory(model.config, batch_size=B, seq_len=T)
