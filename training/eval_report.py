"""Human-readable views of a FrocResult: a fixed-width table for the terminal, Markdown for the model
card, and the FROC plot as a PNG.

matplotlib is imported only inside ``plot_froc`` so that the tables work where it is not installed.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lungnode.training.froc import OPERATING_POINTS, FrocResult, SizeRow

TABLE_POINTS = (1.0, 2.0, 4.0)  # FP/scan columns of the size table


def _num(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.3f}"


def _ci(ci: tuple[float, float] | None) -> str:
    return "-" if ci is None or math.isnan(ci[0]) else f"{ci[0]:.3f}-{ci[1]:.3f}"


def _cells(r: SizeRow) -> list[str]:
    return [r.label, str(r.n_nodules), str(r.n_detected), *(_num(r.operating_points[fp]) for fp in TABLE_POINTS), _num(r.cpm), _ci(r.cpm_ci)]


def _header(result: FrocResult) -> list[str]:
    conf = f"{result.ci.confidence:.0%} CI" if result.ci else "CI"
    return ["diameter", "nodules", "hit", *(f"sens@{fp:g}" for fp in TABLE_POINTS), "CPM", f"CPM {conf}"]


def size_table(result: FrocResult) -> str:
    """Sensitivity at 1, 2 and 4 FP/scan and CPM per nodule size, then all nodules, fixed width."""
    rows = [_header(result)] + [_cells(r) for r in result.per_size]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    summary = (
        f"{result.n_scans} scans, {result.n_nodules} nodules, {result.n_false_positives} false positives "
        f"({result.n_false_positives / result.n_scans:.2f}/scan), {result.n_ignored} candidates on irrelevant findings ignored"
    )
    return "\n".join([*lines, summary])


def markdown_table(result: FrocResult) -> str:
    """The size table and the sensitivity at each of the seven CPM operating points, as Markdown."""
    head = _header(result)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_cells(r)) + " |" for r in result.per_size]
    out += ["", "| FP/scan | " + " | ".join(f"{fp:g}" for fp in OPERATING_POINTS) + " | CPM |", "|" + "---|" * (len(OPERATING_POINTS) + 2)]
    out.append("| sensitivity | " + " | ".join(_num(result.operating_points[fp]) for fp in OPERATING_POINTS) + f" | {_num(result.cpm)} |")
    if result.ci:
        ops = result.ci.operating_points
        out.append(f"| {result.ci.confidence:.0%} CI | " + " | ".join(_ci(ops[fp]) for fp in OPERATING_POINTS) + f" | {_ci(result.ci.cpm)} |")
    return "\n".join(out)


def plot_froc(result: FrocResult, path: str | Path, title: str = "FROC") -> Path:
    """Draw the FROC curve (log-2 FP/scan axis, 1/8 to 8) with its bootstrap band and the seven
    operating points, CPM in the title; write a PNG to ``path`` and return it."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, safe off the main thread

    fig = Figure(figsize=(6.4, 4.8), dpi=150)
    ax = fig.add_subplot()
    label = f"sensitivity ({result.n_nodules} nodules, {result.n_scans} scans)"
    # Sampled densely so that the log axis shows the curve the figures are read from (linear in FP/scan).
    fps = np.geomspace(OPERATING_POINTS[0], OPERATING_POINTS[-1], 600)
    ax.plot(fps, np.interp(fps, result.fps_per_scan, result.sensitivities), color="tab:blue", lw=2, label=label)
    if result.ci:
        ax.fill_between(result.ci.fps_per_scan, result.ci.lower, result.ci.upper, color="tab:blue", alpha=0.15, lw=0,
                        label=f"{result.ci.confidence:.0%} CI ({result.ci.bootstraps} bootstraps)")
    ax.plot(OPERATING_POINTS, [result.operating_points[fp] for fp in OPERATING_POINTS], "o", color="tab:red", clip_on=False, zorder=3, label="CPM operating points")
    cpm = f"CPM {result.cpm:.3f}"
    if result.ci and result.ci.cpm:
        cpm += f" ({result.ci.cpm[0]:.3f}-{result.ci.cpm[1]:.3f})"
    ax.set_title(f"{title}: {cpm}")
    ax.set_xscale("log", base=2)
    ax.set_xlim(OPERATING_POINTS[0], OPERATING_POINTS[-1])
    ax.set_xticks(OPERATING_POINTS, [f"{fp:g}" for fp in OPERATING_POINTS])
    ax.set_ylim(0, 1)
    ax.set_yticks([i / 10 for i in range(11)])
    ax.set_xlabel("average false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.grid(True, which="major", alpha=0.4)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path
