"""Exercises of notebook 03 (bottleneck adapters). Expected answers come from the notebook's equations or from
running ``peft_lab.adapters`` itself, not from stored numbers."""
from __future__ import annotations

from . import exercise, number
from ..tolerance import is_close  # student's order of operations vs ours: float32 reordering


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


@exercise("03.ex2", "Houlsby adapters (two per block) with reduction factor 16 on GPT-2 medium (d = 1024, 24 "
                    "blocks): how many trainable parameters in total?")
def _houlsby_medium(answer):
    from ..adapters import apply_adapters
    from ..measure import count_parameters
    from ..models import build_from_config
    model = apply_adapters(build_from_config("gpt2-medium", device="meta"), placement="houlsby")
    expected = count_parameters(model)[0]
    d, m, layers = 1024, 64, 24
    return number(answer, expected, rel_tol=1e-9,
                  mistakes={layers * (2 * m * d + m + d): "that is one adapter per block (Pfeiffer); Houlsby has "
                                                          "two: after attention and after the MLP.",
                            2 * layers * 2 * m * d: "the biases are missing: each adapter adds m + d of them.",
                            2 * (2 * m * d + m + d): "that is one block; GPT-2 medium has 24."},
                  explain=f"2 adapters × 24 blocks × (2·64·1024 + 64 + 1024) = {expected:,} (counted on the "
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
