"""What a bench group's images score with the evaluators: class accuracy (the embedded models),
prompt adherence (the t2i zoo), Fréchet distance, and each image's verdict, from which a setting's
change from the baseline is measured on the same seeds (``eval/paired.py``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffaccel.bench.config import BenchJob
from diffaccel.calibration.workload import Call
from diffaccel.eval.paired import paired_change
from diffaccel.targets import class_labels, prompt_scores, prompt_verdicts
from diffaccel.zoo.t2i.evaluator import load_t2i_evaluator
from diffaccel.zoo.weights import load_evaluator


def _finite(value: float) -> float | None:
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def scorer(job: BenchJob, calls: list[Call], embedded: bool) -> Callable[[torch.Tensor], dict]:
    """Accuracy (and for the t2i zoo adherence) and Fréchet distance of a group's images: the embedded
    evaluator on class labels, the t2i evaluator on the calls' prompts, or nothing for other pipelines."""
    if embedded:
        evaluator, labels = load_evaluator(), class_labels(calls)
        score = lambda images: evaluator.score(images, labels)  # noqa: E731
        verdicts = lambda images: {"accuracy": evaluator.correct(images, labels)}  # noqa: E731
    elif job.target.get("adherence"):
        t2i = load_t2i_evaluator()
        score = lambda images: prompt_scores(t2i, images, calls)  # noqa: E731
        verdicts = lambda images: prompt_verdicts(t2i, images, calls)  # noqa: E731
    else:
        return lambda images: {"accuracy": None, "adherence": None, "fd": None, "fd_floor": None, "verdicts": {}}

    def scores_of(images: torch.Tensor) -> dict:
        s = score(images)
        return {"accuracy": s["accuracy"], "adherence": s.get("adherence"), "fd": _finite(s.get("fd", float("nan"))),
                "fd_floor": _finite(s.get("fd_floor", float("nan"))), "verdicts": verdicts(images)}
    return scores_of


def paired(verdicts: dict[str, torch.Tensor], base_verdicts: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Each evaluator score's change from the baseline on the same seeds, with its interval (``paired_change``)."""
    return {metric: paired_change(hits, base_verdicts[metric]) for metric, hits in verdicts.items()}
