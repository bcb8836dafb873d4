"""Exercises of notebook 03 (bottleneck adapters). Expected answers come from the notebook's equations or from
running ``peft_lab.adapters`` itself, not from stored numbers."""
from __future__ import annotations

from ..tolerance import is_close  # student's order of operations vs ours: float32 reordering
from . import exercise, first_failure, number


@exercise("03.ex1", "Write bottleneck(h, down, up): the adapter function f(h) = W_up · relu(W_down · h + b_down) "
                    "+ b_up of equation (03.1), where down and up are nn.Linear layers. Pass the function itself.")
def _bottleneck(answer):
    import torch
    from torch import nn

    from ..adapters import BottleneckAdapter
    if not callable(answer):
        raise TypeError(f"expected a function bottleneck(h, down, up), got {type(answer).__name__}")
    g = torch.Generator().manual_seed(3)
    for d, m, shape in ((16, 4, (3,)), (32, 8, (2, 5)), (24, 3, (1, 7))):
        layer = BottleneckAdapter(nn.Identity(), d, m, "relu", init="bert")
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        h = torch.randn(*shape, d, generator=g)
        got = answer(h, layer.adapter_down[0], layer.adapter_up)
        if not isinstance(got, torch.Tensor):
            return False, f"your function returned {type(got).__name__}, not a tensor"
        if got.shape != h.shape:
            return False, f"for h of shape {tuple(h.shape)} you returned shape {tuple(got.shape)}; f maps d → d"
        want = layer.bottleneck(h)
        if is_close(got, want + h):
            return False, "that is f(h) + h, the adapter with its residual; f alone has no '+ h'"
        if is_close(got, layer.adapter_up(layer.adapter_down[0](h))):
            return False, "the nonlinearity is missing: relu between the two projections"
        if not is_close(got, want):
            return False, (f"differs from BottleneckAdapter.bottleneck by up to {(got - want).abs().max():.3g} "
                           f"(d={d}, m={m}); check the order down → relu → up and both biases")
    return True, "equal to peft_lab's BottleneckAdapter on three random shapes, biases included."


@exercise("03.ex2", "Houlsby adapters (two per block) with reduction factor 16 on GPT-2 large (d = 1280, 36 "
                    "blocks): how many trainable parameters in total?")
def _houlsby_large(answer):
    from ..adapters import apply_adapters
    from ..measure import count_parameters
    from ..models import build_from_config
    model = apply_adapters(build_from_config("gpt2-large", device="meta"), placement="houlsby")
    expected = count_parameters(model)[0]
    d, m, layers = 1280, 80, 36
    return number(answer, expected, rel_tol=1e-9,
                  mistakes={layers * (2 * m * d + m + d): "that is one adapter per block (Pfeiffer); Houlsby has "
                                                          "two: after attention and after the MLP.",
                            2 * layers * 2 * m * d: "the biases are missing: each adapter adds m + d of them.",
                            2 * (2 * m * d + m + d): "that is one block; GPT-2 large has 36."},
                  explain=f"2 adapters × 36 blocks × (2·80·1280 + 80 + 1280) = {expected:,} (counted on the "
                          "meta device by apply_adapters).")


@exercise("03.ex3", "A Pfeiffer adapter at d = 768, m = 48 (GPT-2 small, reduction factor 16): how many "
                    "multiply-adds per token does it add at inference (weights only, ignore biases and relu)?")
def _flops(answer):
    d, m = 768, 48
    expected = 2 * m * d
    return number(answer, expected, rel_tol=1e-9,
                  mistakes={0: "adapters cannot be merged into a weight (a nonlinearity sits between W_down and "
                               "W_up), so the cost stays.",
                            m * d: "that is one projection; there are two (down and up).",
                            2 * m * d + m + d: "that is the parameter count; biases and relu are to be ignored."},
                  explain=f"W_down (m×d) and W_up (d×m): 2·m·d = {expected:,} per token, about "
                          f"{expected / (12 * d * d):.1%} of a block's 12·d² multiply-adds.")


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
                    "sublayer reading its input. Pass the class itself.")
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
