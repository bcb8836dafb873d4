"""Figures shared by the notebooks: training curves, memory breakdowns, trainable-parameter counts.

Each helper draws on ``ax`` (new figure when ``None``), labels its axes with units and returns what it drew
on, so a notebook can add to it. Rules they keep: one quantity per axis, no bars on a log axis (a bar's
length must mean something), log axes named in the label. Notebook 00 introduces the memory plot; every
method notebook's "Train" and "Measure" sections use all three.
"""
from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np

from . import validate

MEMORY_PARTS = ("parameters", "gradients", "optimizer", "activations")
_PART_COLORS = {"parameters": "#4c72b0", "gradients": "#dd8452", "optimizer": "#c44e52",
                "activations": "#55a868"}
_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


def memory_unit(num_bytes: float) -> tuple[str, int]:
    """The largest binary unit in which ``num_bytes`` is at least 1: ``("GiB", 2**30)``, ``("MiB", 2**20)`` …"""
    for name, size in _UNITS:
        if num_bytes >= size:
            return name, size
    return "B", 1


def _nonempty(mapping, what: str) -> None:
    validate.require_mapping(what, mapping, fix=f'pass a dict of label -> value, e.g. {what}={{"LoRA r=8": ...}}')


def _loss_falls_tenfold(histories: Mapping) -> bool:
    """Whether some curve's loss falls by 10x or more (then a log axis shows both its start and its end)."""
    for h in histories.values():
        loss = np.asarray(h.loss, dtype=float)
        loss = loss[np.isfinite(loss) & (loss > 0)]
        if len(loss) and loss.max() >= 10 * loss.min():
            return True
    return False


def plot_history(histories: Mapping, metric_name: str = "accuracy", axes=None, smooth: int = 1,
                 log_loss: bool | None = None, percent: bool = False):
    """Loss vs step (left) and ``metric_name`` vs step (right) for each labelled :class:`~peft_lab.train.History`.

    ``smooth`` > 1 overlays a running mean over that many steps on the (noisy) per-batch loss. ``log_loss``:
    draw the loss on a log axis; ``None`` (default) chooses it when a curve falls by 10x or more. The metric
    panel's title is ``metric_name`` as given, prefixed with "Validation" unless the name already says so.
    ``percent``: the metric is a fraction, drawn as a percentage (0-100). Returns the two Axes.
    """
    _nonempty(histories, "histories")
    for label, h in histories.items():
        if not all(hasattr(h, a) for a in ("step", "loss", "eval_step", "metric")):
            raise TypeError(f"histories[{label!r}] must be a History (what train returns), "
                            f"got {validate.describe(h)}")
    validate.require_str("metric_name", metric_name)
    smooth = validate.require_int("smooth", smooth, min=1)
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss, ax_metric = axes
    for i, (label, h) in enumerate(histories.items()):
        color = f"C{i}"
        steps, loss = np.asarray(h.step), np.asarray(h.loss, dtype=float)
        if smooth > 1 and len(loss) >= smooth:
            ax_loss.plot(steps, loss, color=color, alpha=0.25, lw=0.8)
            kernel = np.ones(smooth) / smooth
            ax_loss.plot(steps[smooth - 1:], np.convolve(loss, kernel, mode="valid"), color=color, label=label)
        else:
            ax_loss.plot(steps, loss, color=color, label=label)
        if h.metric:
            ax_metric.plot(h.eval_step, [100 * m if percent else m for m in h.metric], "o-", color=color, ms=3,
                           label=label)
    if log_loss is None:
        log_loss = _loss_falls_tenfold(histories)
    if log_loss:
        ax_loss.set_yscale("log")
    loss_label = "training loss (cross-entropy, nats/token" + (", log scale)" if log_loss else ")")
    ax_loss.set(xlabel="training step", ylabel=loss_label, title="Training loss")
    metric_label = metric_name
    if "accuracy" in metric_name and "(" not in metric_name:
        metric_label = f"{metric_name} ({'%' if percent else 'fraction correct'})"
    title = metric_name if metric_name.lower().startswith("validation") else f"Validation {metric_name}"
    ax_metric.set(xlabel="training step", ylabel=metric_label, title=title[0].upper() + title[1:])
    for ax in axes:
        ax.grid(alpha=0.3, which="both" if ax is ax_loss and log_loss else "major")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    ax_loss.figure.tight_layout()
    return axes


def plot_memory(breakdowns: Mapping, ax=None, unit: str | None = None,
                title: str = "Memory of one training step", xlabel: str = "configuration"):
    """Stacked bars of parameters / gradients / optimizer state / activations per labelled breakdown.

    ``breakdowns`` maps a label to a dict like :func:`peft_lab.measure.measure_memory` returns (bytes). The
    unit (MiB, GiB, …) is chosen from the largest total unless given. Totals are written above the bars; a
    ``"cuda_peak"`` entry, when present, is marked with a black line. Returns the Axes.
    """
    _nonempty(breakdowns, "breakdowns")
    for label, b in breakdowns.items():
        validate.require_mapping(f"breakdowns[{label!r}]", b,
                                 fix="pass what measure_memory or estimate_memory returns")
        missing = [k for k in MEMORY_PARTS if k not in b]
        if missing:
            raise ValueError(f"breakdown {label!r} lacks {missing}")
        for k in MEMORY_PARTS + ("cuda_peak",):
            if k in b:
                validate.require_real(f"breakdowns[{label!r}][{k!r}]", b[k], min=0)
    largest = max(sum(b[k] for k in MEMORY_PARTS) for b in breakdowns.values())
    if unit is None:
        unit, size = memory_unit(largest)
    else:
        sizes = dict(_UNITS)
        if unit not in sizes:
            raise ValueError(f"unit must be one of {list(sizes)}, got {unit!r}")
        size = sizes[unit]
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.5, 1.4 * len(breakdowns) + 2), 3.8))
    labels = list(breakdowns)
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for part in MEMORY_PARTS:
        values = np.array([breakdowns[k][part] / size for k in labels])
        ax.bar(x, values, bottom=bottom, color=_PART_COLORS[part], label=part, width=0.6)
        bottom += values
    for xi, total in zip(x, bottom):
        # one format for every bar: 3 significant digits, never an exponent ("2,059" beside "616", not "2.06e+03")
        label = f"{total:,.0f}" if total >= 100 else f"{total:.3g}"
        ax.annotate(label, (xi, total), ha="center", va="bottom", fontsize="small",
                    xytext=(0, 2), textcoords="offset points")
    peaks = [(xi, breakdowns[k]["cuda_peak"] / size) for xi, k in zip(x, labels) if "cuda_peak" in breakdowns[k]]
    if peaks:
        ax.hlines([p for _, p in peaks], [xi - 0.35 for xi, _ in peaks], [xi + 0.35 for xi, _ in peaks],
                  colors="black", lw=2, label="CUDA peak (measured)")
    ax.set_xticks(x, labels)
    ax.set(xlabel=xlabel, ylabel=f"memory ({unit})", title=title)
    ax.set_ylim(0, bottom.max() * 1.15 if bottom.max() > 0 else 1)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    ax.figure.tight_layout()
    return ax


def plot_parameters(counts: Mapping, log: bool = True, ax=None, title: str = "Trainable parameters",
                    xlabel: str = "method"):
    """Trainable-parameter count per label, each count written beside its mark.

    ``log=True`` (default, for counts spanning orders of magnitude): a dot plot on a log axis — a bar's
    length means nothing on a log axis, so none is drawn. ``log=False``: linear bars. Returns the Axes.
    """
    _nonempty(counts, "counts")
    values = [validate.require_int(f"counts[{k!r}]", c, min=0) for k, c in counts.items()]
    log = validate.require_bool("log", log)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(counts) + 1.5), 3.6))
    x = np.arange(len(values))
    colors = [f"C{i}" for i in range(len(values))]
    log = log and any(v > 0 for v in values)
    if log:
        shown = [v if v > 0 else np.nan for v in values]  # 0 has no place on a log axis: left out, labelled
        ax.scatter(x, shown, color=colors, s=60, zorder=3)
        ax.set_yscale("log")
        positive = [v for v in values if v > 0]
        ax.set_ylim(bottom=min(positive) / 4, top=max(positive) * 6)
        marks = [v if v > 0 else min(positive) / 4 for v in values]
    else:
        ax.bar(x, values, color=colors, width=0.6)
        ax.set_ylim(0, max(max(values) * 1.15, 1))
        marks = values
    for xi, v, m in zip(x, values, marks):
        ax.annotate(f"{v:,}", (xi, m), ha="center", va="bottom", fontsize="small", xytext=(0, 5),
                    textcoords="offset points")
    ax.set_xticks(x, list(counts))
    ax.set_xlim(-0.6, len(values) - 0.4)
    ax.set(xlabel=xlabel, ylabel="trainable parameters (count" + (", log scale)" if log else ")"), title=title)
    ax.grid(axis="y", alpha=0.3, which="both" if log else "major")
    ax.figure.tight_layout()
    return ax


def draw_adapter_placements(axes=None):
    """Notebook 03's block figure: where the bottleneck adapters sit in a pre-LN transformer block (03.3).

    Three panels, input at the bottom: Houlsby (an adapter on each sublayer's output, before its residual
    add: ``x₁ = (f_a(a) + a) + x``, ``out = (f_y(y) + y) + x₁``), Pfeiffer (one adapter after the MLP reading
    ``z = y + x₁``, its own skip is ``y``: ``out = (f(z) + y) + x₁``) and parallel (a branch beside LN 2 and
    the MLP reading ``x₁``: ``out = (s·f(x₁) + y) + x₁``). Each ⊕ is one addition of the formula; each adapter
    has its own skip line. Returns the three Axes.
    """
    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(13, 6.2))
    if len(axes) != 3:
        raise ValueError(f"axes must be three Axes (one per placement), got {len(axes)}")
    frozen, adapter = "#dde5f0", "#f6c89f"
    mx, rx, sx = 4.0, 1.3, 6.6           # main stream, residual line (left), adapter skip / branch (right)

    def box(ax, x, y, text, color, w=2.6):
        ax.add_patch(plt.Rectangle((x - w / 2, y - 0.35), w, 0.7, fc=color, ec="k", lw=0.8, zorder=2))
        ax.text(x, y, text, ha="center", va="center", fontsize=9, zorder=3)

    def add(ax, x, y):
        ax.add_patch(plt.Circle((x, y), 0.27, fc="white", ec="k", lw=0.8, zorder=2))
        ax.text(x, y, "+", ha="center", va="center", fontsize=11, zorder=3)

    def line(ax, points, arrow=False, color="k"):
        xs, ys = zip(*points)
        if arrow:
            ax.plot(xs[:-1], ys[:-1], color=color, lw=1, zorder=1)
            ax.annotate("", xy=points[-1], xytext=points[-2],
                        arrowprops=dict(arrowstyle="-|>", color=color, lw=1, shrinkA=0, shrinkB=0), zorder=1)
        else:
            ax.plot(xs, ys, color=color, lw=1, zorder=1)

    def dot(ax, x, y):
        ax.plot([x], [y], "o", color="k", ms=3.5, zorder=3)

    def label(ax, y, text):
        ax.text(mx + 0.15, y, text, ha="left", va="center", fontsize=9, style="italic")

    def residual(ax, y_from, y_to, name):
        """The block's skip: from a split on the main stream to the ⊕ at y_to, on the left."""
        dot(ax, mx, y_from)
        line(ax, [(mx, y_from), (rx, y_from), (rx, y_to), (mx - 0.27, y_to)], arrow=True, color="grey")
        ax.text(rx - 0.2, (y_from + y_to) / 2, f"residual {name}", rotation=90, ha="right", va="center",
                fontsize=8, color="grey")

    def adapter_with_skip(ax, y_split, y_box, y_add, name, skip_name):
        """An adapter on the main stream, its own skip on the right into the ⊕ just above it."""
        dot(ax, mx, y_split)
        line(ax, [(mx, y_split), (sx, y_split), (sx, y_add), (mx + 0.27, y_add)], arrow=True)
        ax.text(sx + 0.15, (y_split + y_add) / 2, f"skip {skip_name}", rotation=90, ha="left", va="center",
                fontsize=8)
        box(ax, mx, y_box, name, adapter)

    # y positions shared by the panels, bottom to top
    y = dict(x=0.5, split_x=1.0, ln1=1.8, attn=3.0, a_split=3.75, f_a=4.5, a_add=5.3, res1=6.1, split_x1=6.8,
             ln2=7.6, mlp=8.8, y_split=9.55, z_add=10.25, f_y=11.0, y_add=11.8, res2=12.6, out=13.5)
    titles = ("Houlsby: two adapters, each on a\nsublayer's output before its residual add",
              "Pfeiffer: one adapter after the MLP,\nreading z = y + x₁; its own skip is y",
              "parallel: a branch beside the MLP,\nreading x₁, scaled by s")
    formulas = ("x₁ = (f_a(a) + a) + x\nout = (f_y(y) + y) + x₁", "out = (f(z) + y) + x₁,  z = y + x₁",
                "out = (s·f(x₁) + y) + x₁")
    for ax, placement, title, formula in zip(axes, ("houlsby", "pfeiffer", "parallel"), titles, formulas):
        ax.set_xlim(0, 9.5)
        ax.set_ylim(-0.9, 14.2)
        ax.axis("off")
        ax.set_title(title, fontsize=10)
        ax.text(mx, -0.55, formula, ha="center", va="center", fontsize=9)
        line(ax, [(mx, y["x"]), (mx, y["out"])], arrow=True)          # the main stream, input to output
        ax.text(mx - 0.15, y["x"], "x", ha="right", va="center", fontsize=10, style="italic")
        ax.text(mx - 0.15, y["out"], "out", ha="right", va="center", fontsize=10, style="italic")
        box(ax, mx, y["ln1"], "LN 1", frozen)
        box(ax, mx, y["attn"], "attention", frozen)
        label(ax, y["a_split"] - 0.1, "a")
        residual(ax, y["split_x"], y["res1"], "x")
        add(ax, mx, y["res1"])
        label(ax, (y["res1"] + y["ln2"]) / 2 - 0.1, "x₁")
        box(ax, mx, y["ln2"], "LN 2", frozen)
        box(ax, mx, y["mlp"], "MLP", frozen)
        label(ax, y["y_split"] - 0.3, "y")
        residual(ax, y["split_x1"], y["res2"], "x₁")
        add(ax, mx, y["res2"])
        if placement == "houlsby":
            adapter_with_skip(ax, y["a_split"], y["f_a"], y["a_add"], "adapter f_a", "a")
            add(ax, mx, y["a_add"])
            adapter_with_skip(ax, y["y_split"], y["f_y"], y["y_add"], "adapter f_y", "y")
            add(ax, mx, y["y_add"])
        elif placement == "pfeiffer":
            adapter_with_skip(ax, y["y_split"], y["f_y"], y["y_add"], "adapter f", "y")
            add(ax, mx, y["y_add"])
            # z = y + x₁ feeds the adapter only: a branch of the residual line into the ⊕ below it
            dot(ax, rx, y["z_add"])
            line(ax, [(rx, y["z_add"]), (mx - 0.27, y["z_add"])], arrow=True, color="grey")
            add(ax, mx, y["z_add"])
            ax.text(mx + 0.35, y["z_add"], "z", ha="left", va="center", fontsize=9, style="italic")
        else:
            # the branch leaves the stream at x₁ (below LN 2) and joins the MLP's output y in a ⊕
            bx = 7.6
            dot(ax, mx, 7.05)
            line(ax, [(mx, 7.05), (bx, 7.05), (bx, y["mlp"] - 0.35)], arrow=True)
            ax.text(bx + 0.15, 7.35, "x₁", ha="left", va="center", fontsize=9, style="italic")
            box(ax, bx, y["mlp"], "adapter f", adapter, w=2.2)
            line(ax, [(bx, y["mlp"] + 0.35), (bx, y["y_add"]), (mx + 0.27, y["y_add"])], arrow=True)
            ax.text(bx + 0.15, (y["mlp"] + y["y_add"]) / 2, "× s", ha="left", va="center", fontsize=9)
            add(ax, mx, y["y_add"])
    axes[0].figure.tight_layout()
    return axes
