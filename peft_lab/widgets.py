"""ipywidgets explorers used by the notebooks (each also has a plain function that draws one static result).

Notebook 00, "Explore: memory of full fine-tuning vs a frozen base".
"""
from __future__ import annotations

import matplotlib.pyplot as plt

from .estimate import estimate_memory
from .plots import memory_unit, plot_memory

MODEL_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "llama-7b")


def _num_parameters(name: str) -> int:
    from .models import meta_size
    return meta_size(name)[1]


def show_memory(name: str = "gpt2", precision: str = "fp32", trainable_percent: float = 1.0,
                batch_size: int = 1, seq_len: int = 512):
    """Plot the estimated memory of full fine-tuning vs a frozen base with ``trainable_percent`` % trained.

    Uses :func:`peft_lab.estimate.estimate_memory`; prints the totals. Returns the Axes.
    """
    total = _num_parameters(name)
    trainable = round(total * trainable_percent / 100)
    full = estimate_memory(name, None, batch_size, seq_len, precision)
    peft = estimate_memory(name, trainable, batch_size, seq_len, precision)
    unit, size = memory_unit(full["total"])
    ax = plot_memory({"full fine-tuning": full, f"frozen base + {trainable_percent:g}%": peft}, unit=unit,
                     title=f"{name}, {precision}, batch {batch_size}×{seq_len} (estimate)")
    print(f"{name}: {total:,} parameters, {trainable:,} trained in the PEFT case")
    print(f"full fine-tuning {full['total'] / size:.2f} {unit}  |  frozen base + {trainable_percent:g}%: "
          f"{peft['total'] / size:.2f} {unit}  (ratio {full['total'] / peft['total']:.1f}x)")
    plt.show()
    return ax


def memory_explorer(names=MODEL_NAMES):
    """An ``ipywidgets.interactive`` around :func:`show_memory`: model, precision, trained %, batch, length.

    Its controls start at :func:`show_memory`'s defaults, so ``show_memory()`` draws its first state statically."""
    import ipywidgets as w

    return w.interactive(
        show_memory,
        name=w.Dropdown(options=list(names), value=names[0], description="model"),
        precision=w.ToggleButtons(options=["fp32", "bf16-mixed"], value="fp32", description="precision"),
        # the start value must lie on the slider's grid 10**(-2 + 0.25k): a value off the grid is snapped by the
        # browser right after display, and that second render came out blank in JupyterLab
        trainable_percent=w.FloatLogSlider(value=1.0, base=10, min=-2, max=1, step=0.25,
                                           description="trained %"),
        batch_size=w.IntSlider(value=1, min=1, max=32, description="batch"),
        seq_len=w.Dropdown(options=[128, 256, 512, 1024], value=512, description="seq len"),
    )
