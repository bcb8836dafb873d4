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
    assert axes[0].get_yscale() == "linear"  # 2.1 -> 1.0 is not a 10x fall
    assert axes[1].get_title() == "Validation accuracy"
    # each run's own numbers under its own name (swapped or shifted curves fail)
    for name, run in (("full FT", h), ("LoRA", g)):
        [smoothed] = [ln for ln in axes[0].get_lines() if ln.get_label() == name]
        assert list(smoothed.get_xdata()) == run.step[1:]
        assert list(smoothed.get_ydata()) == pytest.approx([(a + b) / 2 for a, b in zip(run.loss, run.loss[1:])])
        assert any(list(ln.get_ydata()) == run.loss and ln.get_color() == smoothed.get_color()
                   for ln in axes[0].get_lines())          # the raw curve beside it, in its colour
        [metric] = [ln for ln in axes[1].get_lines() if ln.get_label() == name]
        assert (list(metric.get_xdata()), list(metric.get_ydata())) == (run.eval_step, run.metric)
        assert metric.get_color() == smoothed.get_color()
    plt.close("all")


def test_plot_history_log_loss_and_titles():
    falling = History(step=[1, 2, 3], loss=[10.0, 1.0, 0.5], eval_step=[0, 3], metric=[0.5, 0.9])
    ax_loss, ax_metric = plot_history({"full FT": falling}, metric_name="validation accuracy")
    assert ax_loss.get_yscale() == "log" and "log scale" in ax_loss.get_ylabel()  # fell 20x: log axis
    assert ax_metric.get_title() == "Validation accuracy"  # no "Validation validation accuracy"
    assert "fraction" in ax_metric.get_ylabel()
    ax_loss, _ = plot_history({"full FT": falling}, log_loss=False)
    assert ax_loss.get_yscale() == "linear" and "log" not in ax_loss.get_ylabel()
    plt.close("all")


def test_plot_memory_units_and_labels():
    mib = {"parameters": 3 * 2**20, "gradients": 3 * 2**20, "optimizer": 6 * 2**20, "activations": 2**20}
    ax = plot_memory({"full": mib, "frozen": {**mib, "gradients": 0, "optimizer": 0}})
    assert _labelled(ax) and "MiB" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["full", "frozen"]
    # the bars carry the numbers, in MiB, each configuration's at its own tick
    stacks = {}
    for bar in ax.patches:
        stacks.setdefault(round(bar.get_x() + bar.get_width() / 2), []).append(bar.get_height())
    assert {x: sum(hs) for x, hs in stacks.items()} == pytest.approx({0: 13.0, 1: 4.0})
    assert sorted(stacks[0]) == pytest.approx([1, 3, 3, 6]) and sorted(h for h in stacks[1] if h) == [1, 3]
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
    counts = {"full FT": 124_439_808, "LoRA r=8": 294_912, "prompt": 15_360}
    ax = plot_parameters(counts, log=log)
    assert _labelled(ax) and ("log" in ax.get_ylabel()) == log
    assert ax.get_yscale() == ("log" if log else "linear")
    # no bars on a log axis (a bar's length would mean nothing); linear bars otherwise
    assert len(ax.patches) == (0 if log else 3)
    labels = {t.get_text() for t in ax.texts}
    assert {f"{v:,}" for v in counts.values()} <= labels  # every value written out
    plt.close("all")


def test_memory_explorer_static_and_widget():
    from peft_lab.widgets import memory_explorer, show_memory

    ax = show_memory("gpt2", "bf16-mixed", trainable_percent=1.0, batch_size=2, seq_len=128)
    assert "GiB" in ax.get_ylabel() and len(ax.get_xticklabels()) == 2
    assert memory_explorer().children  # the interactive builds its controls
    plt.close("all")


def test_memory_explorer_first_render_is_its_static_figure():
    """Every control starts on a value it can show, so the browser sends no update right after display (an
    off-grid start, 0.5 on a 10**(-2 + 0.25k) slider, was snapped to 0.5623 and that re-render came out blank);
    and the first render, the controls' values passed to show_memory, draws bars — the figure show_memory()
    draws with its defaults, which the notebook shows beside the widget."""
    import inspect
    import math

    from peft_lab.widgets import memory_explorer, show_memory

    ex = memory_explorer()
    controls = {c.description: c for c in ex.children if hasattr(c, "description") and hasattr(c, "value")}
    slider = controls["trained %"]
    k = (math.log10(slider.value) - slider.min) / slider.step
    assert math.isclose(k, round(k), abs_tol=1e-9), f"trained % starts off its grid at {slider.value}"
    for c in controls.values():
        if hasattr(c, "options"):
            assert c.value in [o[1] if isinstance(o, tuple) else o for o in c.options]
        elif hasattr(c, "max"):
            assert c.min <= c.value <= c.max
    defaults = {k: v.default for k, v in inspect.signature(show_memory).parameters.items()}
    assert ex.kwargs == defaults, "the widget starts where the static figure beside it is drawn"
    ax = show_memory(**ex.kwargs)
    heights = [p.get_height() for p in ax.patches]
    assert heights and all(h >= 0 for h in heights) and sum(heights) > 0, "the first render draws the bars"
    assert not any("0.562" in t.get_text() for t in ax.get_xticklabels())
    plt.close("all")


def test_plot_memory_totals_share_one_format():
    """Totals are written without exponents, so a 2,059 MiB bar does not read "2.06e+03" beside "616"."""
    mib = lambda total: {"parameters": total * 2**20, "gradients": 0, "optimizer": 0, "activations": 0}  # noqa: E731
    ax = plot_memory({"full": mib(2059.2), "LoRA": mib(616.4), "small": mib(14.53)}, unit="MiB")
    assert [t.get_text() for t in ax.texts] == ["2,059", "616", "14.5"]


def test_adapter_placement_figure_has_one_add_per_addition_and_its_adapters():
    """Notebook 03's block figure: each ⊕ is one addition of (03.3), each orange box one adapter."""
    import matplotlib.colors as mcolors

    from peft_lab.plots import draw_adapter_placements
    axes = draw_adapter_placements()
    adds = [sum(isinstance(p, plt.Circle) for p in ax.patches) for ax in axes]
    boxes = [sum(isinstance(p, plt.Rectangle) and mcolors.same_color(p.get_facecolor(), "#f6c89f")
                 for p in ax.patches) for ax in axes]
    # Houlsby: f_a + a, + x, f_y + y, + x₁; Pfeiffer: + x, y + x₁ (z), f(z) + y, + x₁; parallel: + x, s·f + y, + x₁
    assert adds == [4, 4, 3] and boxes == [2, 1, 1]
    plt.close("all")
