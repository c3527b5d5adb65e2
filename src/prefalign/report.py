"""Plots and tables of a run: PNG figures from metrics.jsonl, markdown tables for reports."""

from __future__ import annotations

import os

from prefalign.metrics import read_jsonl

PANELS = [
    ("loss", ["loss", "eval/loss"]),
    ("rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
    ("accuracy", ["rewards/accuracies", "eval/rewards/accuracies"]),
    ("logps", ["logps/chosen", "logps/rejected"]),
]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_series(path: str, records: list[dict], keys: list[str], title: str, marks: dict | None = None) -> bool:
    """One PNG with a line per key (x = step); `marks` = {label: step} draws vertical lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    for k in keys:
        pts = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=k, marker="." if len(pts) < 30 else None)
            drawn = True
    for label, step in (marks or {}).items():
        ax.axvline(step, color="red", linestyle="--", linewidth=1)
        ax.text(step, ax.get_ylim()[1], f" {label}", color="red", va="top", fontsize=8)
    if drawn:
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def plot_training(output: str) -> list[str]:
    """The standard figures of a training run, written to OUTPUT/plots/."""
    records = read_jsonl(os.path.join(output, "metrics.jsonl"))
    if not records:
        return []
    os.makedirs(os.path.join(output, "plots"), exist_ok=True)
    fired = next((r["step"] for r in records if r.get("alarm/both_drop")), None)
    written = []
    for name, keys in PANELS:
        path = os.path.join(output, "plots", f"{name}.png")
        marks = {"both-drop alarm": fired} if fired and name == "logps" else None
        if plot_series(path, records, keys, name, marks):
            written.append(path)
    return written


def markdown_table(rows: list[dict], columns: list[str] | None = None, digits: int = 3) -> str:
    columns = columns or list(rows[0])
    def fmt(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def print_table(rows: list[dict], columns: list[str] | None = None, title: str | None = None) -> None:
    """A rich table on the console."""
    from rich.console import Console
    from rich.table import Table

    columns = columns or list(rows[0])
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns])
    Console().print(table)
