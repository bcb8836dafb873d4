"""Notebook 06's harness: every method switches off to the exact base, counts at real sizes equal the
reference libraries' figures, and a run trains only the method's parameters."""
import copy

import pytest
import torch

import peft_lab
from peft_lab import compare

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", list(compare.METHODS))
def test_every_method_switches_off_to_the_exact_base(tiny, name):
    base, tok = tiny
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    model = compare.METHODS[name].apply(copy.deepcopy(base), tok)
    for p in model.parameters():  # move the method away from its (possibly identity) initialisation
        if p.requires_grad:
            with torch.no_grad():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    if compare.METHODS[name].quantized_base:  # QLoRA switches off to its NF4 base, the weights it trains on
        base = peft_lab.quantize_model(copy.deepcopy(base))
    with torch.no_grad():
        want = base(input_ids=ids).logits
        moved = model(input_ids=ids).logits
        if not compare.METHODS[name].can_switch_off:
            with pytest.raises(ValueError, match="nothing|no adapter"):
                with compare.switched_off(model):
                    pass
            return
        assert not torch.equal(moved, want)
        with compare.switched_off(model):
            assert torch.equal(model(input_ids=ids).logits, want)


@pytest.mark.parametrize("name, expected", [("LoRA r=8", 294_912), ("full FT", 124_439_808),
                                            ("QLoRA r=8", 294_912), ("IA3", 64_512), ("PEFT IA3", 64_512)])
def test_counts_at_real_size(name, expected):
    """gpt2-small: PEFT's LoRA r=8 on c_attn trains 294,912 (PEFT's own count, notebook 02), and so does QLoRA
    (LoRA on the NF4 base); IA3 64,512 (PEFT's line); full fine-tuning every parameter."""
    assert compare.trainable_count(name, "gpt2") == expected


def test_dora_count_at_real_size_is_peft_s():
    """DoRA r=8 on gpt2-small: LoRA's 294,912 plus one magnitude per c_attn output (12 × 2,304), as PEFT counts
    it."""
    import peft
    model = peft.get_peft_model(peft_lab.build_from_config("gpt2", device="meta"),
                                peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, task_type="CAUSAL_LM"))
    theirs = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert compare.trainable_count("DoRA r=8", "gpt2") == theirs == 294_912 + 12 * 2_304


def test_calculator_precisions():
    """QLoRA exists only with its 4-bit base, where it is LoRA r=8's row; full FT has no 4-bit base."""
    assert compare.calculator("QLoRA r=8", "gpt2", precision="4bit-base") == compare.calculator(
        "LoRA r=8", "gpt2", precision="4bit-base")
    for name, precision in (("QLoRA r=8", "fp32"), ("QLoRA r=8", "bf16-mixed"), ("full FT", "4bit-base")):
        assert not compare.has_precision(name, precision)
        with pytest.raises(ValueError):
            compare.calculator(name, "gpt2", precision=precision)


def test_calculator_equals_measurement_on_tiny(tiny):
    base, _ = tiny
    batch = {"input_ids": torch.randint(0, 1000, (4, 24), generator=torch.Generator().manual_seed(0))}
    for name in compare.CALCULATOR_METHODS:
        if compare.has_precision(name, "fp32"):
            calc = compare.calculator(name, "tiny", batch_size=4, seq_len=24)
            assert calc == compare.measured(name, base, batch), name


def test_qlora_measured_is_lora_on_the_stored_nf4_base(tiny):
    """QLoRA's step keeps what LoRA's keeps (same adapter, same activations); its parameters are the bytes the
    NF4 base stores, measured from the tensors (qlora.stored_bytes)."""
    from peft_lab import qlora
    base, tok = tiny
    batch = {"input_ids": torch.randint(0, 1000, (4, 24), generator=torch.Generator().manual_seed(0))}
    q, lo = compare.measured("QLoRA r=8", base, batch), compare.measured("LoRA r=8", base, batch)
    assert {k: q[k] for k in ("gradients", "optimizer", "activations")} == {
        k: lo[k] for k in ("gradients", "optimizer", "activations")}
    model = compare.METHODS["QLoRA r=8"].apply(copy.deepcopy(base), tok)
    assert q["parameters"] == qlora.stored_bytes(model)["total"] < lo["parameters"] / 3


def test_run_trains_the_method_only_and_leaves_the_base(tiny):
    base, tok = tiny
    before = {k: v.clone() for k, v in base.state_dict().items()}
    rows = peft_lab.load_task("train", n=32)
    val = peft_lab.load_task("val", n=16)
    r = compare.run("LoRA r=8", base, tok, peft_lab.encode_task(rows, tok), val,
                    lr=1e-2, steps=3, batch_size=8, eval_every=3, keep_model=True)
    assert r.trainable == 16_384 and r.history.step == [1, 2, 3]
    assert r.accuracy == r.history.final_metric == peft_lab.evaluate_task(r.model, tok, val)["accuracy"]
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    with pytest.raises(ValueError, match="unknown method"):
        compare.run("DoRA", base, tok, [], [], lr=1e-3)


def test_steps_to_reach_and_spread():
    h = peft_lab.History(eval_step=[0, 25, 50], metric=[0.5, 0.92, 0.88])
    assert compare.steps_to_reach(h, 0.9) == 25 and compare.steps_to_reach(h, 0.95) is None
    assert compare.spread([0.9, 1.0, 0.95]) == pytest.approx((0.95, 0.9, 1.0))
    with pytest.raises(ValueError):
        compare.spread([])


@pytest.mark.parametrize("arch", ["tiny", "tiny-llama"])
def test_stored_count_of_prefix_is_the_folded_prefix(arch):
    """What a prefix-tuning task stores after training: the folded prefix (notebook 04), not the projection."""
    from peft_lab.prefix import fold_prefix_projection
    model = compare.METHODS["prefix"].apply(peft_lab.build_from_config(arch, device="cpu"), None)
    assert peft_lab.count_parameters(model)[0] == compare.trainable_count("prefix", arch)
    fold_prefix_projection(model)
    assert peft_lab.count_parameters(model)[0] == compare.stored_count("prefix", arch) < compare.trainable_count(
        "prefix", arch)
    assert compare.stored_count("LoRA r=8", arch) == compare.trainable_count("LoRA r=8", arch)
