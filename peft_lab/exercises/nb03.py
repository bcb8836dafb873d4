"""Exercises of notebook 03 (bottleneck adapters). Expected answers come from the notebook's equations or from
running ``peft_lab.adapters`` itself, not from stored numbers."""
from __future__ import annotations

from functools import lru_cache

from ..tolerance import is_close  # student's order of operations vs ours: float32 reordering
from . import exercise, first_failure
from .hinted import hinted

#: the small random GPT-2 of 03.ex1 (a depth and width the notebook never builds)
SMALL_GPT2 = dict(n_layer=6, n_embd=64, n_head=4, vocab_size=1024, n_positions=64)


@lru_cache(maxsize=None)
def _first_step_gradients() -> tuple[int, int]:
    """(adapter tensors with a non-zero gradient after the first backward pass, all adapter tensors) for Houlsby
    adapters with init="zero" on :data:`SMALL_GPT2` (random weights, a random batch)."""
    import torch
    from transformers import GPT2Config

    from ..adapters import apply_adapters
    from ..models import build_from_config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = GPT2Config(**SMALL_GPT2, bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM")
        model = apply_adapters(build_from_config(cfg, device="cpu", seed=0), placement="houlsby", init="zero")
        ids = torch.randint(0, cfg.vocab_size, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return sum(p.grad is not None and bool((p.grad != 0).any()) for p in trainable), len(trainable)


@exercise("03.ex1", "Predict, then measure: Houlsby adapters (two per block, init='zero', so W_up = 0 and b_up = 0) "
                    "on a random 6-block GPT-2. Each adapter has four tensors (W_down, b_down, W_up, b_up). After "
                    "the FIRST backward pass, how many of the model's adapter tensors hold a non-zero gradient? "
                    "check() builds the model, runs the backward pass and explains the count; exact.",
          kind="predict", hidden=lambda: ["{} of {}".format(*_first_step_gradients()),
                                          "{} / {}".format(*_first_step_gradients())])
def _predict_gradients(answer):
    from numbers import Real

    from . import as_number
    answer = as_number(answer)
    if isinstance(answer, bool) or not isinstance(answer, Real):
        raise TypeError("predict one number: how many adapter tensors get a non-zero gradient")
    moving, total = _first_step_gradients()
    why = (f"measured: {moving} of {total} adapter tensors. In every adapter W_up and b_up get a gradient (the "
           "bottleneck's hidden units are not zero), while the gradient reaching W_down and b_down passes through "
           "W_upᵀ = 0 — the same as in section 3's Pfeiffer step, now 2 adapters x 6 blocks.")
    if answer == moving:
        return True, why
    if answer == total:
        return False, f"your prediction {answer:g}: not every tensor can move in the first step. " + why
    if answer == moving / 2:
        return False, f"your prediction {answer:g}: Houlsby has two adapters per block. " + why
    return False, f"your prediction {answer:g}. " + why


@lru_cache(maxsize=None)
def _llama_pfeiffer() -> int:
    from ..adapters import apply_adapters
    from ..measure import count_parameters
    from ..models import build_from_config
    return count_parameters(apply_adapters(build_from_config("llama-7b", device="meta"), placement="pfeiffer",
                                           bottleneck_dim=64))[0]


@exercise("03.ex2", "A Pfeiffer adapter (one per block) with a fixed bottleneck m = 64 on llama-7b (d = 4096, "
                    "32 blocks): how many trainable parameters in total? Exact.",
          kind="compute", hidden=lambda: [f"{_llama_pfeiffer():,}", str(_llama_pfeiffer())])
def _pfeiffer_llama(answer):
    expected = _llama_pfeiffer()
    d, m, layers = 4096, 64, 32
    assert expected == layers * (2 * m * d + m + d)   # (03.2) against the meta-device count
    return hinted(answer, expected, rel_tol=1e-9,
                  mistakes={2 * expected: "that is two adapters per block (Houlsby); Pfeiffer has one, after the MLP.",
                            layers * 2 * m * d: "the biases are missing: each adapter adds m + d of them.",
                            2 * m * d + m + d: "that is one block; llama-7b has 32.",
                            layers * (2 * 256 * d + 256 + d): "that is reduction factor 16 (m = 256); the question "
                                                                "fixes m = 64."},
                  hint="Equation (03.2) per adapter, 2md + m + d; one adapter in each of the 32 blocks.",
                  explain=f"32 x (2·64·4096 + 64 + 4096) = {expected:,} — 0.25% of the 6.7B base (counted on the "
                          "meta device by apply_adapters).")


# ----------------------------------------------------------------------------------------------------------
# 03.ex3 (debug): a checkpoint of the whole model where the adapter alone was meant
# ----------------------------------------------------------------------------------------------------------

def _read_tensors(path: str) -> dict:
    """A saved dict of tensors: safetensors when the file is one, else ``torch.load`` (weights only)."""
    import torch
    try:
        from safetensors.torch import load_file
        return load_file(path)
    except Exception:  # not a safetensors file: a torch.save pickle, read without running code
        return torch.load(path, weights_only=True)


@exercise("03.ex3", "Debug: save_adapter(model, path) in section 12 writes a file far larger than the adapter it "
                    "should hold. Fix it so that the file (torch.save of a dict of tensors, or a safetensors "
                    "file) holds the adapter's tensors only, with the keys of peft_lab.bottleneck_state_dict, and "
                    "pass the fixed function to check(); it is run on adapters the notebook never trains.",
          kind="debug", hidden=lambda: [])
def _debug_checkpoint(answer):
    import os
    import tempfile

    import torch

    from ..adapters import apply_adapters, bottleneck_state_dict
    from ..models import load_base_model
    from . import run_student
    with torch.random.fork_rng(devices=[]):
        for placement, seed in (("houlsby", 5), ("parallel", 6)):
            torch.manual_seed(seed)
            model = apply_adapters(load_base_model("tiny", device="cpu")[0], placement=placement, init="bert")
            want = bottleneck_state_dict(model)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "adapter.pt")
                run_student(answer, model, path)
                if not os.path.isfile(path):
                    return False, "save_adapter(model, path) should write a file at path"
                size = os.path.getsize(path)
                saved = _read_tensors(path)
            adapter_bytes = sum(t.numel() * t.element_size() for t in want.values())
            if not isinstance(saved, dict):
                return False, f"the file should hold a dict of tensors, it holds {type(saved).__name__}"
            extra = sorted(set(saved) - set(want))
            renamed = len(extra) == len(want) and sorted(t.numel() for t in saved.values()) == sorted(
                t.numel() for t in want.values())
            if renamed:
                return False, (f"the file holds the adapter's {len(want)} tensors, but under other keys (e.g. "
                               f"{extra[0]!r}); keep the keys of bottleneck_state_dict, so that a loader finds them")
            if extra:
                base_bytes = sum({saved[k].untyped_storage().data_ptr(): saved[k].untyped_storage().nbytes()
                                  for k in extra}.values())          # a tied embedding is stored once
                return False, (f"the file holds {len(extra)} tensors that are not the adapter's (e.g. {extra[0]!r}), "
                               f"{base_bytes:,} B of frozen base weights next to the adapter's {adapter_bytes:,} B. "
                               "The frozen base is the same for every adapter and ships once; an adapter file keeps "
                               "the trained tensors only.")
            missing = sorted(set(want) - set(saved))
            if missing:
                return False, (f"{len(missing)} adapter tensors are missing (e.g. {missing[0]!r}); "
                               f"use the keys of bottleneck_state_dict ({placement} adapters)")
            if any(not torch.equal(saved[k].cpu(), want[k].cpu()) for k in want):
                return False, "the saved tensors differ from the adapter's current values"
            if size > adapter_bytes + 64_000:
                return False, (f"the file is {size:,} B for {adapter_bytes:,} B of adapter tensors: are views of "
                               "larger tensors being saved whole? (.clone() them)")
    return True, (f"the file holds the adapter only (Houlsby and parallel adapters on tiny, {adapter_bytes:,} B "
                  "of tensors for the last one) and not the 3.6 MiB base with its tied embedding; loading it needs "
                  "the same base and apply_adapters first.")


# ----------------------------------------------------------------------------------------------------------
# 03.ex4: the student's own parallel adapter with its scaling s, graded by running it against the package's
# ----------------------------------------------------------------------------------------------------------

#: (d, m, s, input shape) — widths, bottlenecks and scalings the notebook never shows, 2-D and 3-D inputs.
_PARALLEL_CASES = [(16, 4, 4.0, (5, 16)), (24, 3, 0.5, (2, 3, 24)), (32, 8, 2.5, (1, 7, 32))]


def _sublayer(d: int):
    """A frozen stand-in for a block's feed-forward branch: LN → Linear → GELU → Linear (what x₁ enters)."""
    from torch import nn
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


def _parallel_reference(sublayer, d: int, m: int, s: float):
    """The package's parallel adapter (equation 03.3, placement "parallel") around ``sublayer``, with the
    :class:`ResidualTap` that hands it the sublayer's input: ``ref(x) = sublayer(x) + s·f(x)``."""
    from torch import nn

    from ..adapters import BottleneckAdapter, ResidualTap
    layer = BottleneckAdapter(sublayer, d, m, "relu", placement="parallel", scaling=s, init="zero")
    tap = ResidualTap(nn.Identity(), layer)
    return layer, lambda x: layer(tap(x))


def _check_parallel_case(cls, case, seed: int) -> str | None:
    """Run the student's class on one case; None if it behaves like the package's parallel adapter."""
    import copy

    import torch
    from torch import nn

    from . import run_student

    d, m, s, shape = case
    where = f"(d = {d}, m = {m}, s = {s:g}, input of shape {shape})"
    torch.manual_seed(seed)
    sub = _sublayer(d)
    frozen = {k: v.clone() for k, v in sub.state_dict().items()}
    x = torch.randn(shape)
    mine = run_student(cls, copy.deepcopy(sub), d, m, s)
    down, up = getattr(mine, "down", None), getattr(mine, "up", None)
    if not (isinstance(down, nn.Linear) and isinstance(up, nn.Linear)):
        return ("the adapter needs two nn.Linear layers with bias, self.down (d → m) and self.up (m → d); found "
                f"down={type(down).__name__}, up={type(up).__name__}")
    if (down.in_features, down.out_features, up.in_features, up.out_features) != (d, m, m, d) \
            or down.bias is None or up.bias is None:
        return f"down must be nn.Linear({d}, {m}) and up nn.Linear({m}, {d}), both with bias {where}"
    trainable = {n for n, p in mine.named_parameters() if p.requires_grad}
    want = {"down.weight", "down.bias", "up.weight", "up.bias"}
    if trainable != want:
        extra, missing = sorted(trainable - want), sorted(want - trainable)
        return (f"only the adapter trains: {extra} still require gradients (freeze the sublayer)" if extra else
                f"{missing} do not require gradients; the adapter's layers must train")
    def is_sublayer(mod):
        state = mod.state_dict()
        return set(state) == set(frozen) and all(torch.equal(state[k], frozen[k]) for k in frozen)
    if not any(is_sublayer(mod) for mod in mine.modules()):
        return "keep the sublayer you were given, unchanged, as the frozen part"
    if not (bool((up.weight == 0).all()) and bool((up.bias == 0).all())):
        return "up (weight and bias) must start at zero, so that the adapter starts as the sublayer exactly (03.4)"
    if bool((down.weight == 0).all()):
        return ("down must not start at zero (keep nn.Linear's own init): with W_down = 0 as well, no gradient "
                "would ever reach W_up (as with LoRA's A = B = 0)")
    with torch.no_grad():
        start = run_student(mine, x)
    if not isinstance(start, torch.Tensor) or start.shape != x.shape:
        return f"forward must return a tensor of the input's shape {tuple(x.shape)} {where}"
    if not torch.equal(start, sub(x)):
        if is_close(start, x + sub(x)):
            return f"the block's residual '+ x' is added by the block, not by this module {where}"
        return f"at initialisation the output must be exactly sublayer(x) (W_up = 0, b_up = 0) {where}"

    ref, ref_fn = _parallel_reference(copy.deepcopy(sub), d, m, s)
    with torch.no_grad():  # the same random, non-zero adapter weights in both
        for p in (down.weight, down.bias, up.weight, up.bias):
            p.copy_(torch.randn(p.shape) * 0.3)
        ref.adapter_down[0].load_state_dict(down.state_dict())
        ref.adapter_up.load_state_dict(up.state_dict())
    got, want_out = run_student(mine, x), ref_fn(x)
    if not is_close(got, want_out):
        with torch.no_grad():
            y, f = sub(x), lambda h: up(torch.relu(down(h)))
            guesses = [(y + f(x), "the scaling s is missing: out = sublayer(x) + s·f(x)"),
                       (y + s * f(y), "the adapter reads the sublayer's output; a parallel adapter reads its "
                                      "input x, beside the sublayer (that is what makes it parallel)"),
                       (y + s * up(down(x)), "the nonlinearity is missing: relu between down and up"),
                       (x + y + s * f(x), "the block's residual '+ x' is added by the block, not by this module"),
                       (s * (y + f(x)), "s scales the adapter's output only, not the sublayer's")]
        for guess, reason in guesses:
            if is_close(got, guess):
                return f"{reason} {where}"
        return (f"the output differs from sublayer(x) + s·f(x) by up to {(got - want_out).abs().max():.3g} "
                f"{where} (equation 03.3, parallel)")
    g = torch.randn(x.shape)
    (got * g).sum().backward()
    (want_out * g).sum().backward()
    pairs = (("down.weight", down.weight, ref.adapter_down[0].weight),
             ("down.bias", down.bias, ref.adapter_down[0].bias),
             ("up.weight", up.weight, ref.adapter_up.weight), ("up.bias", up.bias, ref.adapter_up.bias))
    for name, p, q in pairs:
        if p.grad is None:
            return f"no gradient reached {name}: use the layer itself in forward (not .data or .detach())"
        if not is_close(p.grad, q.grad):
            return f"the gradient of {name} differs from the package's parallel adapter {where}"
    return None


@exercise("03.ex4", "Write class MyParallelAdapter(nn.Module) with __init__(self, sublayer, d, m, s): keep the "
                    "sublayer frozen, add trainable self.down = nn.Linear(d, m) and self.up = nn.Linear(m, d) with "
                    "up starting at zero; forward(x) = sublayer(x) + s·up(relu(down(x))), the adapter beside the "
                    "sublayer reading its input. Pass the class itself.",
          kind="build", hidden=lambda: [])
def _parallel(answer):
    if not isinstance(answer, type):
        raise TypeError(f"pass the class itself (check('03.ex4', MyParallelAdapter)), got {type(answer).__name__}")
    reason = first_failure(_PARALLEL_CASES, lambda case, seed: _check_parallel_case(answer, case, seed=seed),
                           seed=200)
    if reason is not None:
        return False, reason
    shapes = "; ".join(f"d={d}, m={m}, s={s:g}" for d, m, s, _ in _PARALLEL_CASES)
    return True, (f"your adapter equals peft_lab's parallel adapter (placement='parallel') on {len(_PARALLEL_CASES)} "
                  f"random cases ({shapes}): frozen sublayer, identity at init, outputs and the gradients of "
                  "W_down, b_down, W_up, b_up.")
