"""Plot helpers return labelled Axes (Agg backend, set in conftest)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from peft_lab.plots import memory_unit, plot_history, plot_memory, plot_parameters  # noqa: E402
from peft_lab.train import History  # noqa: E402


def _labelled(ax):
    return ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


def test_plot_history():
    h = History(step=[1, 2, 3, 4], loss=[2.0, 1.5, 1.2, 1.0], eval_step=[0, 4], metric=[0.5, 0.8])
    g = History(step=[1, 2, 3, 4], loss=[2.1, 1.9, 1.8, 1.7], eval_step=[0, 4], metric=[0.5, 0.6])
    axes = plot_history({"full FT": h, "LoRA": g}, metric_name="accuracy", smooth=2)
    assert len(axes) == 2 and all(_labelled(ax) for ax in axes)
    assert "accuracy" in axes[1].get_ylabel()
    assert len(axes[0].get_lines()) == 4 and len(axes[1].get_lines()) == 2
    plt.close("all")


def test_plot_memory_units_and_labels():
    mib = {"parameters": 3 * 2**20, "gradients": 3 * 2**20, "optimizer": 6 * 2**20, "activations": 2**20}
    ax = plot_memory({"full": mib, "frozen": {**mib, "gradients": 0, "optimizer": 0}})
    assert _labelled(ax) and "MiB" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["full", "frozen"]
    gib = {k: v * 1024 for k, v in mib.items()}
    ax = plot_memory({"big": {**gib, "cuda_peak": 12 * 2**30}})
    assert "GiB" in ax.get_ylabel()
    with pytest.raises(ValueError):
        plot_memory({"x": {"parameters": 1}})
    with pytest.raises(ValueError):
        plot_memory({})
    plt.close("all")


def test_memory_unit():
    assert memory_unit(3 * 2**30) == ("GiB", 2**30)
    assert memory_unit(2**30 - 1)[0] == "MiB"
    assert memory_unit(10)[0] == "B"


@pytest.mark.parametrize("log", [True, False])
def test_plot_parameters(log):
    ax = plot_parameters({"full FT": 124_439_808, "LoRA r=8": 294_912, "prompt": 15_360}, log=log)
    assert _labelled(ax) and "log" in ax.get_ylabel() if log else _labelled(ax)
    assert ax.get_yscale() == ("log" if log else "linear")
    plt.close("all")


def test_memory_explorer_static_and_widget():
    from peft_lab.widgets import memory_explorer, show_memory

    ax = show_memory("gpt2", "bf16-mixed", trainable_percent=1.0, batch_size=2, seq_len=128)
    assert "GiB" in ax.get_ylabel() and len(ax.get_xticklabels()) == 2
    assert memory_explorer().children  # the interactive builds its controls
    plt.close("all")
