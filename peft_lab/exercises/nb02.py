"""Exercises of notebook 02 (LoRA). Expected answers are computed from the notebook's equations, not stored.

Ids are ``"02.exN"`` so that they cannot be mistaken for the notebook's equation tags ``(02.N)``.
"""
from __future__ import annotations

import copy
import math
from functools import lru_cache

from . import exercise, first_failure, run_student
from .hinted import hinted


def _lora_params(rank: int, d_in: int, d_out: int) -> int:
    """Equation (02.5): A is r × d_in, B is d_out × r."""
    return rank * (d_in + d_out)


#: A LLaMA-style model with grouped-query attention the notebook never builds (d = 4096, 32 query heads sharing
#: 8 key/value heads, so k_proj and v_proj map 4096 -> 1024).
GQA_CONFIG = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=11008,
                  num_hidden_layers=32, vocab_size=32000)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@lru_cache(maxsize=None)
def _gqa_lora_count(rank: int = 16, targets=tuple(ATTENTION)) -> int:
    from transformers import LlamaConfig

    from ..lora import apply_lora
    from ..measure import count_parameters
    from ..models import build_from_config
    model = build_from_config(LlamaConfig(**GQA_CONFIG), device="meta")
    return count_parameters(apply_lora(model, rank=rank, target_modules=list(targets)))[0]


@exercise("02.ex1", "A LLaMA-style model with d = 4096, 32 layers and grouped-query attention (32 query heads share "
                    "8 key/value heads of size 128, so k_proj and v_proj map 4096 -> 1024): how many trainable "
                    "parameters does LoRA of rank r = 16 add on all four attention projections (q_proj, k_proj, "
                    "v_proj, o_proj) of every layer? Exact.",
          kind="compute", hidden=lambda: [f"{_gqa_lora_count():,}", str(_gqa_lora_count())])
def _params(answer):
    expected = _gqa_lora_count()
    L, d, r, d_kv = 32, 4096, 16, 1024
    per_layer = 2 * r * (d + d) + 2 * r * (d + d_kv)
    assert expected == L * per_layer    # eq. (02.5) per projection, against the meta-device count
    return hinted(answer, expected, rel_tol=1e-9,
                  mistakes={L * 4 * r * 2 * d: "k_proj and v_proj are narrower under grouped-query attention: "
                                              "4096 -> 8 x 128 = 1024, not 4096.",
                            per_layer: "that is one layer; the model has 32.",

                            L * 4 * d * d: "that counts the full weights; LoRA trains r(d_in + d_out) per projection.",
                            expected / 2: "that is half: q_proj and v_proj only (PEFT's default) at r = 16 — or "
                                          "all four at rank 8. The question adapts all four projections at r = 16."},
                  hint="Eq. (02.5) per projection: r (d_in + d_out). q_proj and o_proj are 4096 x 4096; work out "
                       "k_proj's and v_proj's output width from the heads; then 4 projections x 32 layers.",
                  explain=f"per layer 2 x 16 x (4096 + 4096) + 2 x 16 x (4096 + 1024) = {per_layer:,}; x 32 layers "
                          f"= {expected:,} (counted with apply_lora on the meta device).")


@lru_cache(maxsize=None)
def _batch64_memory() -> dict:
    import torch

    from ..data import collate, encode_task, load_task
    from ..lora import apply_lora
    from ..measure import measure_memory
    from ..models import load_base_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, tok = load_base_model("tiny", device="cpu")
        apply_lora(model, rank=8, alpha=16)
        batches = {b: collate(encode_task(load_task("train", n=b), tok), tok.eos_token_id) for b in (16, 64)}
        mem = {b: measure_memory(model, batch) for b, batch in batches.items()}
    return {"mem": mem, "shape": {b: tuple(batch["input_ids"].shape) for b, batch in batches.items()}}


@exercise("02.ex2", "Predict, then measure: section 5's memory table measured one training step of LoRA r = 8 on "
                    "c_attn (tiny) on a batch of the first 16 training examples. Predict the TOTAL in MiB of the same "
                    "step on the first 64 training examples (padded to the longest). check() then measures it with "
                    "measure_memory and explains the gap; within ±5% counts as right.",
          kind="predict", hidden=lambda: [f"{_batch64_memory()['mem'][64]['total'] / 2**20:.2f}"])
def _predict_memory(answer):
    from numbers import Real

    from . import as_number
    answer = as_number(answer)
    if isinstance(answer, bool) or not isinstance(answer, Real):
        raise TypeError("predict one number, the total in MiB")
    m = _batch64_memory()
    small, big = m["mem"][16], m["mem"][64]
    MiB = 2**20
    total = big["total"] / MiB
    states = (big["parameters"] + big["gradients"] + big["optimizer"]) / MiB
    (b1, t1), (b2, t2) = m["shape"][16], m["shape"][64]
    gap = (answer - total) / total
    why = (f"measured {total:.2f} MiB (your prediction {answer:g}, {gap:+.0%}). Weights, gradients and AdamW state "
           f"do not depend on the batch: {states:.2f} MiB at both sizes. Activations went from "
           f"{small['activations'] / MiB:.2f} to {big['activations'] / MiB:.2f} MiB: they scale with batch x length, "
           f"here {b1} x {t1} -> {b2} x {t2} tokens ({b2 * t2 / (b1 * t1):.1f}x). On this model activations dominate, "
           "so LoRA's saving in the model states is a small share of a large batch's memory.")
    if abs(gap) <= 0.05:
        return True, why
    if math.isclose(answer, 4 * small["total"] / MiB, rel_tol=0.05):
        return False, "you scaled everything by 4; only the activations grow with the batch — " + why
    return False, why


@exercise("02.ex3", "You trained LoRA r = 8 with lora_alpha = 16 (plain LoRA, s = α/r) and now switch to rank 32 "
                    "with rsLoRA (use_rslora=True). Which lora_alpha gives the same scaling s as before? Two "
                    "decimals.",
          kind="compute", hidden=lambda: [f"{2 * math.sqrt(32):.2f}"])
def _rslora(answer):
    from ..lora import lora_scaling
    target = lora_scaling(8, 16)
    expected = target * math.sqrt(32)
    assert math.isclose(lora_scaling(32, expected, use_rslora=True), target)
    return hinted(answer, expected, rel_tol=1e-3,
                  mistakes={target * 32: "that keeps s with plain LoRA's α/r; rsLoRA divides by √r.",
                            16: "with the same α, rsLoRA's s = 16/√32 ≈ 2.83 differs from the 2 you had.",
                            2 * math.sqrt(8): "that is the α that gives s = 2 at r = 8 under rsLoRA; the new rank "
                                              "is 32.",
                            target / math.sqrt(32): "upside down: s = α/√r, so α = s·√r."},
                  hint="First the old s = α/r; then solve s = α/√r for α at r = 32 (equation 02.6).",
                  explain=f"s = 16/8 = 2 before; rsLoRA needs α = s·√32 = {expected:.2f}. PEFT's lora_alpha is "
                          "not 'the scaling' — what it means depends on the rule.")


# ----------------------------------------------------------------------------------------------------------
# 02.ex4 (debug): an adapter without effect — the optimizer was built before apply_lora created the factors
# ----------------------------------------------------------------------------------------------------------

def _debug_setting():
    from ..data import collate, encode_task, load_task
    from ..models import load_base_model
    base, tok = load_base_model("tiny", device="cpu")
    rows = load_task("train")[1000:1000 + 8 * 16]           # examples the notebook's cells do not start with
    batches = [collate(encode_task(rows[16 * i:16 * i + 16], tok), tok.eos_token_id) for i in range(8)]
    return base, batches


@exercise("02.ex4", "Debug: train_lora(base, batches) in section 5 returns a model whose outputs equal the base "
                    "model's after training. Find the bug, fix it, and pass your fixed train_lora to check(); it is "
                    "run on other batches and must return a trained LoRA model whose base weights are untouched.",
          kind="debug", hidden=lambda: [])
def _debug_optimizer(answer):
    import torch

    from ..lora import lora_layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base, batches = _debug_setting()
        frozen = {k: v.clone() for k, v in base.state_dict().items()}
        model = run_student(answer, base, batches)
        if not isinstance(model, torch.nn.Module):
            return False, f"train_lora should return the trained model, got {type(model).__name__}"
        layers = list(lora_layers(model))
        if not layers:
            return False, "the returned model has no LoRA layers: return the model apply_lora gave back"
        after = base.state_dict()
        if set(after) != set(frozen) or any(not torch.equal(v, frozen[k]) for k, v in after.items()):
            return False, "the base model passed in was changed: train a copy (copy.deepcopy) and leave base as it was"
        moved = [n for n, l in layers if bool((l.lora_B.weight != 0).any())]
        if not moved:
            return False, ("every lora_B is still zero, so the adapter adds nothing: LoRA's factors never took an "
                           "optimizer step. Which parameters does the optimizer hold, and when were they created?")
        base_params = {n: p for n, p in model.named_parameters() if "lora_" not in n}
        if any(p.requires_grad for p in base_params.values()):
            return False, "some base weights still require gradients: LoRA trains the factors only"
        with torch.no_grad():
            model.eval()
            base.eval()
            b = batches[0]
            loss_model, loss_base = model(**b).loss.item(), base(**b).loss.item()
    if not loss_model < loss_base:
        return False, f"the loss did not fall ({loss_base:.3f} -> {loss_model:.3f}); check the learning rate and steps"
    return True, (f"the optimizer now holds the LoRA factors: loss {loss_base:.2f} -> {loss_model:.2f} on a "
                  f"training batch, {len(moved)} of {len(layers)} lora_B matrices moved, base untouched. An optimizer "
                  "keeps references to the tensors it was given; parameters created later are not in it.")


# ----------------------------------------------------------------------------------------------------------
# 02.ex5: the student's own LoRA layer, graded by running it against peft_lab.LoRALinear
# ----------------------------------------------------------------------------------------------------------

#: (d_in, d_out, rank, alpha, use_rslora, input shape, base) — several shapes, both scalings, 2-D and 3-D inputs,
#: nn.Linear and GPT-2's Conv1D (weight stored as (in, out): the notebook's MiniLoRA handles nn.Linear only).
_LAYER_CASES = [
    (16, 24, 4, 8.0, False, (5, 16), "linear"),
    (32, 8, 1, 2.0, True, (2, 3, 32), "conv1d"),
    (7, 13, 3, 5.0, False, (4, 7), "linear"),
    (64, 64, 16, 8.0, True, (2, 5, 64), "linear"),
    (12, 36, 2, 4.0, False, (2, 4, 12), "conv1d"),
]


def _case_name(case) -> str:
    d_in, d_out, r, alpha, rs, shape, kind = case
    layer = f"nn.Linear({d_in}, {d_out})" if kind == "linear" else f"Conv1D(nf={d_out}, nx={d_in})"
    return (f"{layer}, rank={r}, alpha={alpha:g}, use_rslora={rs}, "
            f"input of shape {tuple(shape)}")


def _check_layer_case(cls, case, seed: int) -> str | None:
    """Run the student's class on one case; return None if it behaves like LoRALinear, else the reason."""
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from ..lora import LoRALinear, lora_scaling

    d_in, d_out, r, alpha, rs, shape, kind = case
    conv = kind == "conv1d"
    where = f"with {_case_name(case)}"
    torch.manual_seed(seed)
    base = Conv1D(d_out, d_in) if conv else nn.Linear(d_in, d_out)
    if conv:
        nn.init.normal_(base.bias, std=0.02)
    w0 = base.weight.detach().clone()
    x = torch.randn(shape)
    try:
        layer = cls(copy.deepcopy(base), r, alpha, use_rslora=rs)
    except Exception as err:  # the student's code: report any failure as a reason
        return f"MyLoRA(base, {r}, {alpha:g}, use_rslora={rs}) raised {type(err).__name__}: {err}"
    params = dict(layer.named_parameters())
    for name, want in (("A", (r, d_in)), ("B", (d_out, r))):
        if not isinstance(params.get(name), nn.Parameter):
            return (f"the layer needs an nn.Parameter called {name} of shape {want} (self.{name} = "
                    f"nn.Parameter(...)); found parameters {sorted(params)}")
        if tuple(params[name].shape) != want:
            return (f"{name} has shape {tuple(params[name].shape)} {where}; equation (02.1) wants {want} "
                    f"({'r × d_in' if name == 'A' else 'd_out × r'})")
    A, B = params["A"], params["B"]
    if not (A.requires_grad and B.requires_grad):
        return "A and B must be trainable (requires_grad=True)"
    others = [n for n, p in params.items() if n not in ("A", "B") and p.requires_grad]
    if others:
        return f"the base layer must be frozen (requires_grad=False), but {others} still train"
    bases = [m for m in layer.modules() if isinstance(m, (nn.Linear, Conv1D))]
    if len(bases) != 1 or not torch.equal(bases[0].weight.detach(), w0):
        return f"the layer should keep the {type(base).__name__} it was given (unchanged) as its frozen base {where}"
    if not bool((B.detach() == 0).all()):
        return "B must start at zero, so that ΔW = BA = 0 at step 0 (equation 02.3)"
    bound = 1 / math.sqrt(d_in)
    if bool((A.detach() == 0).all()) or float(A.detach().abs().max()) > bound + 1e-6:
        return (f"A should be drawn like an ordinary linear layer, kaiming_uniform_(a=√5): non-zero and within "
                f"±1/√d_in = ±{bound:.3f} (equation 02.3); a zero A would leave B without gradient")
    # Uniform on ±1/√d_in has standard deviation 1/√(3·d_in). The smallest case has 21 entries, whose sample std
    # sits within ±10% of that (1 s.e.); half of it can only mean a constant or squeezed A, whose rows start
    # (nearly) alike, so the r directions of A would not be independent.
    spread, want = float(A.detach().std()), bound / math.sqrt(3)
    if spread < 0.5 * want:
        return (f"A's entries should be spread over ±1/√d_in like a fresh nn.Linear's weight (kaiming_uniform_(a=√5), "
                f"standard deviation 1/√(3·d_in) = {want:.3f}); yours have standard deviation {spread:.3g} {where} "
                "(equation 02.3)")
    try:
        with torch.no_grad():
            same = torch.allclose(layer(x), base(x), atol=1e-6)
    except Exception as err:
        return f"calling the layer {where} raised {type(err).__name__}: {err}"
    if not same:
        return f"at initialisation the output must equal base(x) exactly (B = 0), but it differs {where}"

    # Give A and B random values, the same in the student's layer and in peft_lab's LoRALinear.
    ref = LoRALinear(copy.deepcopy(base), rank=r, alpha=alpha, use_rslora=rs)
    with torch.no_grad():
        A.copy_(torch.randn(r, d_in) * 0.3)
        B.copy_(torch.randn(d_out, r) * 0.3)
        ref.lora_A.weight.copy_(A)
        ref.lora_B.weight.copy_(B)
    try:
        out = layer(x)
    except Exception as err:
        return f"calling the layer {where} raised {type(err).__name__}: {err}"
    expected = ref(x)
    if out.shape != expected.shape:
        return f"the output has shape {tuple(out.shape)}, expected {tuple(expected.shape)} {where}"
    tol = 1e-5 * (1 + float(expected.detach().abs().max()))
    if float((out - expected).detach().abs().max()) > tol:
        branch = (x @ A.T @ B.T).detach()
        s_right = lora_scaling(r, alpha, rs)
        guesses = [(alpha / r, "α/r"), (alpha / math.sqrt(r), "α/√r"), (1.0, "no scaling (s = 1)"), (alpha, "α itself")]
        for s, label in guesses:
            if not math.isclose(s, s_right) and torch.allclose(out.detach(), base(x).detach() + s * branch, atol=tol):
                want = "α/√r (use_rslora=True)" if rs else "α/r"
                return f"the branch is scaled by {label} {where}; equation (02.6) asks for s = {want} = {s_right:g}"
        worst = float((out - expected).detach().abs().max())
        return f"the output differs from base(x) + s·B(Ax) {where} (max |Δ| = {worst:.2e})"
    g = torch.randn(expected.shape)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    for name, mine, theirs in (("A", A, ref.lora_A.weight), ("B", B, ref.lora_B.weight)):
        if mine.grad is None:
            return f"no gradient reached {name}: use the parameter itself in forward (not .data or .detach())"
        if not torch.allclose(mine.grad, theirs.grad, atol=1e-4 * (1 + float(theirs.grad.detach().abs().max()))):
            return f"the gradient of {name} differs from LoRALinear's {where} (equation 02.4)"

    if not callable(getattr(layer, "merge", None)):
        return "the layer needs a merge() method that folds s·BA into the base weight (equation 02.7)"
    try:
        with torch.no_grad():
            layer.merge()
            merged_out = layer(x)
    except Exception as err:
        return f"merge() or the call after it raised {type(err).__name__}: {err}"
    s_right = lora_scaling(r, alpha, rs)
    delta = s_right * B.detach() @ A.detach()
    w_expected = w0 + (delta.T if conv else delta)
    if not torch.allclose(bases[0].weight.detach(), w_expected, atol=1e-5):
        if conv and tuple(delta.shape) != tuple(w0.shape):
            return (f"after merge() the Conv1D weight should be W0ᵀ + (s·BA)ᵀ: Conv1D stores its weight as (in, out) "
                    f"{tuple(w0.shape)}, so the (out, in) product s·BA goes in transposed (section 2.8) {where}")
        return f"after merge() the base weight should be W0 + s·BA (equation 02.7), in place {where}"
    if not torch.allclose(merged_out, expected.detach(), atol=tol):
        return ("after merge() the output changed: once s·BA is inside W, forward must not add the branch again "
                "(keep a flag such as self.merged)")
    return None


@exercise("02.ex5", "Write your own LoRA layer: class MyLoRA(nn.Module) with __init__(self, base, rank, alpha, "
                    "use_rslora=False) wrapping a frozen nn.Linear OR GPT-2's Conv1D (weight stored as (in, out), "
                    "section 2.8), trainable nn.Parameters A (rank × in) and B (out × rank) initialised as in "
                    "equation (02.3), forward(x) = base(x) + s·B(Ax) with s from (02.6), and merge() that folds s·BA "
                    "into the base weight in place (transposed for Conv1D). Pass the class itself.",
          kind="build", hidden=lambda: [])
def _my_lora(answer):
    if not isinstance(answer, type):
        raise TypeError(f"pass the class itself (check('02.ex5', MyLoRA)), got {type(answer).__name__}")
    reason = first_failure(_LAYER_CASES, lambda case, seed: _check_layer_case(answer, case, seed=seed), seed=100)
    if reason is not None:
        return False, reason
    shapes = "; ".join(f"{'Conv1D ' if kind == 'conv1d' else ''}{d_in}→{d_out}, r={r}{', rsLoRA' if rs else ''}"
                       for d_in, d_out, r, _, rs, _, kind in _LAYER_CASES)
    return True, (f"your layer equals peft_lab's LoRALinear on {len(_LAYER_CASES)} random layers ({shapes}): "
                  "shapes, initialisation, output, gradients of A and B, and merge — for nn.Linear and GPT-2's Conv1D.")
