"""A search's files: ``plan.json`` (the chosen plan), ``front.json`` (the Pareto front with the
hand-made plans), ``summary.json`` and ``front.png``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from diffaccel.errors import SearchError
from diffaccel.eval.io import write_json
from diffaccel.search.config import Budget
from diffaccel.search.result import SearchResult


def output_folder(out: str | Path | None) -> Path | None:
    """The search's output folder, made if missing; a clear error where a file stands."""
    if out is None:
        return None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SearchError(f"out={str(out)!r} is a file: give a folder for the search's outputs")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_outputs(result: SearchResult, budget: Budget, objective: str) -> None:
    out = result.out
    result.plan.save(out / "plan.json")
    write_json(out / "front.json", {
        "budget": budget.text, "objective": objective, "strategy": result.summary["strategy"],
        "model": result.summary["model"], "units": result.summary["units"],
        "chosen": result.chosen.as_dict(),
        "front": [c.as_dict() for c in result.front],
        "handmade": [c.as_dict() for c in result.handmade],
    })
    write_json(out / "summary.json", result.summary)
    plot_front(result, budget, objective, out / "front.png")


def plot_front(result: SearchResult, budget: Budget, objective: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = [1 / c.cost(objective) for c in result.front]
    ys = [c.quality(budget) for c in result.front]
    ax.plot(xs, ys, "o-", color="tab:blue", label=f"{result.summary['strategy']} front")
    for name, marker in (("fora", "s"), ("taylorseer", "^"), ("deepcache", "D"), ("faster_diffusion", "v")):
        hand = [c for c in result.handmade if c.extra.get("name") == name]
        if hand:
            ax.scatter([1 / c.cost(objective) for c in hand], [c.quality(budget) for c in hand], marker=marker,
                       color="tab:orange", alpha=0.8, label=f"{name} (hand-made)")
    ax.scatter([1 / result.chosen.cost(objective)], [result.chosen.quality(budget)], s=160, facecolors="none",
               edgecolors="tab:red", linewidths=2, label="chosen")
    ax.axhline(budget.threshold, color="gray", linestyle="--", linewidth=1, label=f"budget {budget.text}")
    margin = result.summary.get("margin") or 0.0
    if margin > 0:  # what the calibration images had to clear, so that unseen ones meet the budget
        ax.axhline(budget.threshold + margin, color="gray", linestyle=":", linewidth=1,
                   label=f"budget + margin {margin:.2g}{budget.unit()} (what a plan must clear here)")
    ax.set_xlabel("speedup (" + ("MACs" if objective == "macs" else "estimated latency") + ")")
    ax.set_ylabel(f"calibration {budget.metric.upper()}{budget.unit()}")
    ax.set_title(f"{result.summary['model']}: {result.summary['num_steps']} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
