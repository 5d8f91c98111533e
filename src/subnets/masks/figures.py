"""Figures of dynamic mask histories (the overlap heatmap is
[SubnetworkSet.overlap_figure][subnets.masks.subnetwork.SubnetworkSet.overlap_figure])."""

from __future__ import annotations

from typing import Any


def history_figure(history: dict[str, list[dict[str, Any]]]):
    """Sparsity and units changed per mask update, one line per language."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    plot_history(history, top, bottom)
    top.legend(fontsize=8, ncol=2)
    top.set_title("Dynamic subnetworks")
    figure.tight_layout()
    return figure


def plot_history(history: dict[str, list[dict[str, Any]]], top, bottom) -> None:
    """Draw a mask history on two matplotlib axes: share of units removed (``top``) and heads
    changed (``bottom``) at each update, one line per language."""
    for lang, entries in history.items():
        steps = [h["step"] for h in entries]
        top.plot(steps, [h["sparsity"] for h in entries], marker=".", label=lang)
        bottom.plot(steps, [h["changed"] for h in entries], marker=".", label=lang)
    top.set_ylabel("share of units removed")
    bottom.set_ylabel("units changed")
    bottom.set_xlabel("training step")
