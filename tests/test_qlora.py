"""peft_lab.qlora: the NF4 code, block-wise absmax and double quantization, the frozen NF4 layers and QLoRA
(LoRA on an NF4 base) — against an independent computation and against bitsandbytes / PEFT's 4-bit LoRA.

bitsandbytes is in the ``test`` extra: where PEFT_LAB_REQUIRE_BITSANDBYTES=1 (.ci/env, .ci/floor) a missing
bitsandbytes fails its tests; elsewhere they are skipped and the rest run."""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peft_lab
from peft_lab import qlora
from peft_lab.core import fill_seeded
from peft_lab.estimate import QUANTIZED_BASE
from peft_lab.tolerance import assert_close, assert_equal

pytestmark = pytest.mark.usefixtures("one_thread")
BNB_ORDER = "bitsandbytes' CPU matmul sums in another order"


@pytest.fixture(scope="module")
def bnb():
    if importlib.util.find_spec("bitsandbytes") is None:
        if os.environ.get("PEFT_LAB_REQUIRE_BITSANDBYTES") == "1":
            pytest.fail("PEFT_LAB_REQUIRE_BITSANDBYTES=1 but bitsandbytes is not installed (pip install -e '.[test]')")
        pytest.skip("bitsandbytes is not installed (the test extra brings it)")
    import bitsandbytes
    import bitsandbytes.functional  # noqa: F401
    return bitsandbytes


def weights(*shape, seed=0):
    """Weights shaped like a trained layer's: normal, a few larger outliers (absmax blocks then differ)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    return w * (1 + 4 * (torch.rand(shape, generator=g) < 0.01))


# ---------------------------------------------------------------------------------------------------------
# The code and the arithmetic, without bitsandbytes
# ---------------------------------------------------------------------------------------------------------

def test_nf4_code_construction():
    code = qlora.nf4_code()
    assert code.shape == (16,) and code.dtype == torch.float32
    assert code[0] == -1 and code[-1] == 1 and (code == 0).sum() == 1  # normalised; one exact zero
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7  # the asymmetric halves
    assert bool((code.diff() > 0).all())
    # the positive half are standard-normal quantiles, scaled: Φ(v · Φ⁻¹(offset)) at evenly spaced levels
    top = torch.special.ndtri(torch.tensor(qlora.NF4_OFFSET, dtype=torch.float64))
    probs = torch.special.ndtr(code[code > 0].double() * top)
    assert_close(probs.diff(), torch.full((7,), probs.diff().mean().item(), dtype=torch.float64),
                 reason="float32 code values through Φ in float64")


def test_quantization_picks_the_nearest_code():
    """Independent of bitsandbytes: every index is the argmin of |w/absmax − code|, blocks are 64 long."""
    w = weights(96, 64)
    q = qlora.quantize_nf4(w, block_size=64, double_quant=False)
    blocks = w.reshape(-1, 64)
    assert_equal(q.absmax, blocks.abs().amax(1), "absmax per block")
    scaled = blocks / q.absmax[:, None]
    nearest = (scaled.reshape(-1, 1) - qlora.nf4_code()).abs().argmin(1)
    assert torch.equal(q.indices().long(), nearest)
    assert torch.equal(q.packed, (q.indices()[0::2] << 4) | q.indices()[1::2])  # first index in the high nibble


def test_bits_per_parameter_measured_and_in_estimate():
    assert qlora.nf4_bits_per_parameter(64, double_quant=False) == 4.5
    assert qlora.nf4_bits_per_parameter(64, double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256)  # 4.1270
    w = weights(768, 2304)  # gpt2-small's c_attn
    for dq in (False, True):
        q = qlora.quantize_nf4(w, 64, dq)
        extra = 32 / w.numel() if dq else 0  # the fp32 mean, one per tensor
        assert q.bits_per_parameter == pytest.approx(qlora.nf4_bits_per_parameter(64, dq) + extra, rel=1e-12)
    # estimate_memory's "4bit-base" rounds 4.12695 to 4.127 bits
    assert QUANTIZED_BASE["4bit-base"]["base_weight"] * 8 == pytest.approx(qlora.nf4_bits_per_parameter(), abs=1e-4)


def test_double_quant_error_bound():
    """The 8-bit absmax is off by at most half a gap of the dynamic code times its 256-block's scale, and the
    4-bit weights by at most half the widest gap of the NF4 code times their block's absmax."""
    w = weights(384, 128)
    plain, dq = qlora.quantize_nf4(w, double_quant=False), qlora.quantize_nf4(w, double_quant=True)
    scale = torch.repeat_interleave(dq.absmax_scale, 256)[: plain.absmax.numel()]
    err8 = (plain.block_absmax() - dq.block_absmax()).abs() / scale
    assert 0 < err8.max() <= qlora.dynamic_code().diff().max() / 2 * (1 + 1e-5)
    err4 = (w - plain.dequantize()).abs().reshape(-1, 64).amax(1) / plain.absmax
    assert 0 < err4.max() <= qlora.nf4_code().diff().max() / 2 * (1 + 1e-5)


def test_bad_inputs_refused():
    with pytest.raises(ValueError, match="multiple of block_size"):
        qlora.quantize_nf4(torch.randn(10, 10))
    with pytest.raises(TypeError, match="floating-point"):
        qlora.quantize_nf4(torch.ones(64, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match="even"):
        qlora.quantize_nf4(torch.randn(63, 63), block_size=63)
    with pytest.raises(ValueError, match="inf or NaN"):
        qlora.quantize_nf4(torch.full((64,), float("nan")))
    with pytest.raises(TypeError, match="nn.Linear"):
        qlora.LinearNF4(nn.Conv2d(1, 1, 1))


# ---------------------------------------------------------------------------------------------------------
# Whole models: what is quantized, bytes, LoRA on top
# ---------------------------------------------------------------------------------------------------------

def test_quantize_model_and_lora_on_top(tiny):
    model = qlora.quantize_model(copy.deepcopy(tiny[0]))
    kinds = {type(m).__name__ for _, m in qlora.nf4_layers(model)}
    assert kinds == {"Conv1DNF4"} and len(qlora.nf4_layers(model)) == 4 * model.config.n_layer
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.transformer.wte.weight
    assert not any(p.requires_grad for p in model.parameters())
    nbytes = qlora.stored_bytes(model)
    n_quantized = sum(layer.nf4.numel for _, layer in qlora.nf4_layers(model))
    assert nbytes["nf4"] == sum(layer.nf4.nbytes for _, layer in qlora.nf4_layers(model))
    assert nbytes["nf4"] * 8 / n_quantized == pytest.approx(qlora.nf4_bits_per_parameter(), abs=0.01)
    # forward equals the float model holding the dequantized weights
    ids = torch.arange(24).view(2, 12)
    plain = qlora.dequantize_model(copy.deepcopy(model))
    assert not qlora.nf4_layers(plain)
    assert_close(model(ids).logits, plain(ids).logits, reason="x·Wᵀ in our autograd function vs Conv1D's addmm")
    # LoRA wraps the NF4 layers; only A and B train; a merge is refused, not silently lost
    peft_lab.apply_lora(model, rank=4, alpha=8)
    assert isinstance(model.transformer.h[0].attn.c_attn.base_layer, qlora.Conv1DNF4)
    with pytest.raises(TypeError, match="cannot merge"):
        peft_lab.merge_lora(model)
    with pytest.raises(ValueError, match="already has adapter layers"):
        qlora.quantize_model(model)


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_dora_and_ia3_merges_into_an_nf4_base_are_refused(tiny, method):
    """Like LoRA's: a merge writes into the base weight, which an NF4 layer does not store."""
    model = qlora.quantize_model(copy.deepcopy(tiny[0]))
    if method == "dora":
        peft_lab.apply_lora(model, rank=4, alpha=8, use_dora=True)
        merge = peft_lab.merge_lora
    else:
        peft_lab.apply_ia3(model)
        merge = peft_lab.merge_ia3
    ids = torch.arange(12).view(1, 12)
    before = model(ids).logits
    with pytest.raises(TypeError, match="cannot merge"):
        merge(model)
    assert_equal(model(ids).logits, before, what="logits after the refused merge")


def test_llama_linear_layers_and_dtype():
    """LLaMA's nn.Linear layers (untied head kept float); .to(bfloat16) sets the compute dtype and keeps the
    NF4 constants in float32 (rounding them to bf16 would move every weight of a block)."""
    model, _ = peft_lab.load_base_model("tiny-llama", device="cpu")
    model = qlora.quantize_model(model)
    layers = qlora.nf4_layers(model)
    assert {type(m).__name__ for _, m in layers} == {"LinearNF4"} and len(layers) == 7 * model.config.num_hidden_layers
    assert type(model.lm_head) is nn.Linear
    before = layers[0][1].weight
    model.to(torch.bfloat16)
    layer = qlora.nf4_layers(model)[0][1]
    assert layer.weight.dtype == torch.bfloat16 and layer.weight_absmax_scale.dtype == torch.float32
    assert_equal(layer.weight, before.to(torch.bfloat16), "dequantized after .to(bfloat16)")
    peft_lab.apply_lora(model, rank=4, alpha=8)
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.dtype == torch.float32  # PEFT's adapter dtype
    assert model(torch.arange(12).view(1, 12)).logits.dtype == torch.bfloat16


def test_qlora_trains(tiny):
    """A few AdamW steps of LoRA on the NF4 tiny base lower the task loss (a smoke check; notebook 05 runs it)."""
    model, tok = tiny
    model = peft_lab.apply_lora(qlora.quantize_model(copy.deepcopy(model)), rank=4, alpha=8)
    examples = peft_lab.encode_task(peft_lab.load_task("train", 64), tok)
    hist = peft_lab.train(model, examples, steps=12, batch_size=16, lr=1e-2, pad_id=tok.pad_token_id)
    first, last = sum(hist.loss[:3]) / 3, sum(hist.loss[-3:]) / 3
    assert last < 0.8 * first, (first, last)


# ---------------------------------------------------------------------------------------------------------
# Equal to bitsandbytes
# ---------------------------------------------------------------------------------------------------------

def test_code_equals_bitsandbytes(bnb):
    assert_equal(qlora.nf4_code(), bnb.functional.get_4bit_type("nf4", device="cpu"), "NF4 code")
    assert_equal(qlora.dynamic_code(), bnb.functional.create_dynamic_map(), "8-bit dynamic code")


def test_symmetric_code_is_caught(bnb, monkeypatch):
    """The check can fail: 16 symmetric quantiles (no exact zero) dequantize visibly differently."""
    half = torch.special.ndtri(torch.linspace(qlora.NF4_OFFSET, 0.5, 9)[:-1].double()).float()
    symmetric = torch.cat([-half, half]).sort().values / half.max()
    monkeypatch.setattr(qlora, "nf4_code", lambda offset=qlora.NF4_OFFSET: symmetric)
    qlora._table.cache_clear()  # the tables are built once per device: build them from the patched code
    w = weights(128, 128)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    try:
        with pytest.raises(AssertionError):
            assert_close(qlora.quantize_nf4(w, double_quant=False).dequantize(),
                         bnb.functional.dequantize_4bit(packed, state), reason="must not pass")
    finally:
        qlora._table.cache_clear()  # the real code again for the next test


@pytest.mark.parametrize("shape", [(384, 128), (2304, 768)])
def test_quantize_equals_bitsandbytes_without_double_quant(bnb, shape):
    w = weights(*shape)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = qlora.quantize_nf4(w, block_size=64, double_quant=False)
    assert_equal(q.packed, packed.view(-1), "packed 4-bit indices")
    assert_equal(q.absmax, state.absmax, "absmax")
    assert_equal(q.dequantize(), bnb.functional.dequantize_4bit(packed, state), "dequantized weight")


@pytest.mark.parametrize("shape", [(384, 128), (2304, 768)])
def test_double_quant_equals_bitsandbytes(bnb, shape):
    """The 4-bit indices, the mean and the 8-bit scales are bitsandbytes' bit for bit, and our dequantization
    of bitsandbytes' stored state is its own. The 8-bit absmax indices: ours are the nearest code (as
    bitsandbytes' pure-torch kernel picks them); its CPU C kernel picks the neighbour in rare near-ties."""
    from peft_lab.reference_bitsandbytes import nf4_weight_from_bitsandbytes
    w = weights(*shape)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = qlora.quantize_nf4(w, block_size=64, double_quant=True)
    assert_equal(q.packed, packed.view(-1), "packed 4-bit indices")
    assert_equal(q.absmax_offset, state.offset, "mean of the absmax")
    assert_equal(q.absmax_scale, state.state2.absmax, "absmax of the absmax blocks")
    ours8, theirs8 = q.quantized_absmax.long(), state.absmax.long()
    differ = (ours8 != theirs8).nonzero().view(-1)
    assert len(differ) <= 0.01 * len(ours8)
    if len(differ):
        code8 = qlora.dynamic_code()
        scale = torch.repeat_interleave(q.absmax_scale, 256)[: len(ours8)]
        _, absmax = qlora._blockwise(w.reshape(-1), qlora.nf4_code(), 64)
        x = ((absmax - q.absmax_offset) * (1 / scale))[differ]
        mine, theirs = (x - code8[ours8[differ]]).abs(), (x - code8[theirs8[differ]]).abs()
        assert bool((mine <= theirs).all()) and bool(((ours8 - theirs8)[differ].abs() == 1).all())
        # near-ties: its pick is ≤ 1e-4 (of the 256-block's scale) farther off than the nearest; measured worst
        # 2.9e-5 over 4 seeds × 4 shapes (0.19% of the indices differ), the code's steps are up to 7e-3
        assert (theirs - mine).max() <= 1e-4
    assert_equal(nf4_weight_from_bitsandbytes(bnb.nn.Params4bit(packed, quant_state=state)).dequantize(),
                 bnb.functional.dequantize_4bit(packed, state), "bitsandbytes' state dequantized by us")


def test_layers_equal_linear4bit(bnb):
    """Our NF4 Linear and Conv1D vs bitsandbytes' Linear4bit on the same stored weights: output and input
    gradient."""
    from peft_lab.reference_bitsandbytes import copy_bitsandbytes_state, linear4bit
    torch.manual_seed(0)
    for layer in (nn.Linear(128, 384), Conv1D(384, 128)):
        ref = linear4bit(layer, 64, True)
        ours = nn.Sequential(qlora.Conv1DNF4(layer) if isinstance(layer, Conv1D) else qlora.LinearNF4(layer))
        copy_bitsandbytes_state(ours, nn.Sequential(ref))
        x = torch.randn(3, 5, 128, requires_grad=True)
        y_ours, y_ref = ours(x), ref(x)
        assert_close(y_ours, y_ref, reason=BNB_ORDER, what=type(layer).__name__)
        g = torch.randn_like(y_ref)
        (gx_ours,), (gx_ref,) = torch.autograd.grad(y_ours, x, g), torch.autograd.grad(y_ref, x, g)
        assert_close(gx_ours, gx_ref, reason=BNB_ORDER, what="input gradient")


def test_qlora_equals_peft_on_bitsandbytes(bnb, tiny):
    """QLoRA on the tiny model: our LoRA over our NF4 base vs PEFT's LoRA over bitsandbytes' NF4 base, the same
    stored 4-bit tensors and LoRA weights: logits and the LoRA gradients."""
    from peft import LoraConfig, get_peft_model

    from peft_lab.reference_bitsandbytes import bitsandbytes_model, copy_bitsandbytes_state
    ours = peft_lab.apply_lora(qlora.quantize_model(copy.deepcopy(tiny[0])), rank=4, alpha=8)
    theirs = get_peft_model(bitsandbytes_model(copy.deepcopy(tiny[0])),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0))
    assert type(theirs.base_model.model.transformer.h[0].attn.c_attn).__module__ == "peft.tuners.lora.bnb"
    copy_bitsandbytes_state(ours, theirs.base_model.model)
    for name, layer in peft_lab.lora_layers(ours):
        fill_seeded({"A": layer.lora_A.weight.data, "B": layer.lora_B.weight.data}, seed=0, std=0.1)
        other = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            other.lora_A["default"].weight.copy_(layer.lora_A.weight)
            other.lora_B["default"].weight.copy_(layer.lora_B.weight)
    ids = torch.arange(2, 34).view(2, 16)
    out_ours, out_theirs = ours(ids, labels=ids), theirs(input_ids=ids, labels=ids)
    assert_close(out_ours.logits, out_theirs.logits, reason=BNB_ORDER, what="logits")
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name, layer in peft_lab.lora_layers(ours):
        other = theirs.base_model.model.get_submodule(name)
        for mine, ref in ((layer.lora_A, other.lora_A["default"]), (layer.lora_B, other.lora_B["default"])):
            assert_close(mine.weight.grad, ref.weight.grad, reason=BNB_ORDER, what=f"{name} gradient")


@pytest.mark.parametrize("skip", ["lm_head", ["lm_head"], ("lm_head",)])
def test_skip_modules_as_one_string_skips_that_module(skip):
    """One string is a regular expression, as for target_modules, never seven one-letter names."""
    from builders import small_gpt2
    model = small_gpt2()
    qlora.quantize_model(model, skip_modules=skip)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, qlora.LinearNF4)
    assert model.lm_head.weight is model.transformer.wte.weight   # the tied head untouched
    layers = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert {n for n, _ in qlora.nf4_layers(model)} == {f"transformer.h.{i}.{x}" for i in range(2) for x in layers}


def test_reference_skip_modules_as_one_string(bnb):
    from builders import small_gpt2
    from peft_lab.reference_bitsandbytes import bitsandbytes_model
    model = bitsandbytes_model(small_gpt2(), skip_modules="lm_head")
    assert type(model.lm_head) is nn.Linear
