"""Exercises of notebook 05 (head to head). Expected answers are computed by the package, not stored."""
from __future__ import annotations

from . import exercise, number

# GPT-2 shapes the student's function is run on: (width d, bottleneck m, blocks L)
_SHAPES = ((64, 4, 2), (96, 8, 3), (128, 16, 4), (48, 3, 1))


def _counted(d: int, m: int, L: int, placement: str) -> int:
    """Trainable parameters after ``apply_adapters`` on a meta-device GPT-2 of that shape."""
    from transformers import GPT2Config

    from ..adapters import apply_adapters
    from ..measure import count_parameters
    from ..models import build_from_config
    config = GPT2Config(n_embd=d, n_layer=L, n_head=4 if d % 4 == 0 else 1, vocab_size=50, n_positions=16)
    model = apply_adapters(build_from_config(config, device="meta"), placement=placement, bottleneck_dim=m)
    return count_parameters(model)[0]


@exercise("05.ex1", "Write adapter_params(d, m, L, placement) -> the trainable parameters bottleneck adapters "
                    "add to a GPT-2 of width d with L blocks ('pfeiffer' or 'houlsby').")
def _adapter_params(answer):
    if not callable(answer):
        raise TypeError("pass your function itself, e.g. check('05.ex1', adapter_params)")
    for d, m, L in _SHAPES:
        for placement in ("pfeiffer", "houlsby"):
            try:
                got = answer(d, m, L, placement)
            except Exception as err:  # the student's code failed: say where, not a traceback from here
                return False, f"adapter_params({d}, {m}, {L}, {placement!r}) raised {type(err).__name__}: {err}"
            expected = _counted(d, m, L, placement)
            if got is None or got is ...:
                return False, "your function returns nothing yet: return the count."
            if got != expected:
                per = 2 * m * d + m + d
                hint = (" Did you forget the biases (m + d per adapter)?" if got == (2 * m * d) * L *
                        (2 if placement == "houlsby" else 1) else
                        " Houlsby puts two adapters in every block, Pfeiffer one." if got in (per * L, 2 * per * L)
                        else f" One adapter has 2·m·d + m + d = {per:,} parameters.")
                return False, f"adapter_params({d}, {m}, {L}, {placement!r}) returned {got!r}, " \
                              f"apply_adapters trains {expected:,}.{hint}"
    return True, ("(2·m·d + m + d) per adapter — down-projection d→m and up-projection m→d, each with a bias — "
                  "times L adapters for Pfeiffer and 2L for Houlsby; equal to apply_adapters on every shape.")


@exercise("05.ex2", "By what factor does LoRA r=8 on c_attn cut the TOTAL training memory of gpt2-xl at batch "
                    "1x512 in bf16 mixed precision, compared with full fine-tuning (full / LoRA)?")
def _xl_ratio(answer):
    from ..compare import calculator
    full = calculator("full FT", "gpt2-xl", batch_size=1, seq_len=512, precision="bf16-mixed")
    lora = calculator("LoRA r=8", "gpt2-xl", batch_size=1, seq_len=512, precision="bf16-mixed")
    expected = full["total"] / lora["total"]
    grads_opt = (full["gradients"] + full["optimizer"]) / (lora["gradients"] + lora["optimizer"])
    return number(answer, expected, rel_tol=2e-2,
                  mistakes={grads_opt: "that is the cut of gradients + optimizer state alone; the frozen "
                                       "weights and the activations remain in the total.",
                            1 / expected: "upside down: give full / LoRA (> 1)."},
                  explain=f"full {full['total'] / 2**30:.1f} GiB / LoRA {lora['total'] / 2**30:.1f} GiB = "
                          f"{expected:.2f}x: the bf16 weights (2 B each) and the activations stay.")
