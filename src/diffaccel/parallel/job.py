"""A generate job under a parallel mode: which part of the work this rank does, and how the ranks'
results become the one record a single process would write.

* ``cfg`` and ``patch``: every rank runs every call; the denoiser is split inside (``cfg.py``,
  ``patch.py``), so every rank ends with the same images. Work counters are summed over ranks.
* ``batch``: each rank runs its pieces of the calls (``shard.py``); rank 0 gathers the images in
  call order, the pieces' timings, and the work counters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from diffaccel.parallel.cfg import CFGParallel
from diffaccel.parallel.errors import ParallelError
from diffaccel.parallel.exchange import gather_objects, sum_ints
from diffaccel.parallel.group import Group
from diffaccel.parallel.patch import PatchParallel, check_static, check_supported
from diffaccel.plan import Plan

log = logging.getLogger("diffaccel")

MODES = ("cfg", "patch", "batch")
WORK_COUNTS = ("forwards", "steps", "computed", "reused", "forecast")
# a quantized plan rounds activations to integers, which magnifies the float rounding of another batch
# size (and int8-dynamic measures its activation ranges over the batch): both splits change the batch
QUANT_WARNINGS = {
    "cfg": "a quantized plan under CFG parallelism: its activations' rounding to integers magnifies the float "
           "rounding of each rank's smaller batch (the DiT's w8a8 images were 37.6 dB from the single-process "
           "run's); no parallel mode keeps them (--parallel batch gives those of one process whose calls are the "
           "ranks' pieces)",
    "batch": "a quantized plan under batch parallelism: each rank runs its piece of every call as a smaller batch, "
             "and the activations' rounding to integers magnifies that batch size's float rounding (the DiT's "
             "w8a8 images were 35 dB from the single-process run's): the images are those of one process whose "
             "calls are the ranks' pieces (each call's images divided among the ranks), not this run's",
}


@dataclass(frozen=True)
class ParallelConfig:
    """``mode``: cfg, patch or batch; ``warmup_steps``: synchronous steps of each call (patch)."""

    mode: str
    warmup_steps: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ParallelError(f"unknown parallel mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.warmup_steps < 0:
            raise ParallelError(f"--warmup-steps must be 0 or more, got {self.warmup_steps}")

    def describe(self, group: Group) -> dict:
        out: dict[str, Any] = {"mode": self.mode, "world_size": group.world}
        if self.mode == "patch":
            out["warmup_steps"] = self.warmup_steps
        return out


def check_job(config: ParallelConfig | None, group: Group, model: torch.nn.Module, plan: Plan | None) -> None:
    """Refuse what cannot run: several processes without a mode, patch on a model without bands or
    with a runtime rule (ranks would decide differently and their exchanges fall out of step); warn
    where the images will not be the single-process run's (a runtime rule under cfg warns as the split
    meets the plan: ``CFGParallel``)."""
    if config is None:
        if group.world > 1:
            raise ParallelError(f"{group.world} processes were started but no parallel mode was given: pass "
                                "--parallel cfg, patch or batch (or start one process)")
        return
    if config.mode == "patch":
        check_supported(model)
        check_static(plan)
        steps = plan.solver.steps if plan is not None and plan.solver is not None else None
        if steps is not None and config.warmup_steps < steps // 2 and group.world > 1:  # docs/parallel.md
            log.warning("patch parallelism with the plan's %d-step sampler: keys and values one step stale are far "
                        "off when the steps are few (22-28 dB on the DiT at 8-10 steps); --warmup-steps %d keeps "
                        "the first half of the steps exact", steps, steps // 2)
    if config.mode in ("cfg", "batch") and plan is not None and plan.quant is not None and group.world > 1:
        log.warning(QUANT_WARNINGS[config.mode])
    if group.world == 1:
        log.info("--parallel %s in one process: nothing to split (start several with torchrun --nproc-per-node N)",
                 config.mode)


@contextmanager
def split_denoiser(config: ParallelConfig | None, group: Group, model: torch.nn.Module) -> Iterator[None]:
    """The cfg or patch split installed on ``model`` for the duration of the job (nothing for batch)."""
    wrapper: CFGParallel | PatchParallel | None = None
    if config is not None and config.mode == "cfg":
        wrapper = CFGParallel(model, group)
    elif config is not None and config.mode == "patch":
        wrapper = PatchParallel(model, group, config.warmup_steps)
    if wrapper is None:
        yield
        return
    with wrapper:
        yield


def per_image_mean(values: tuple[float, ...], images: int, group: Group) -> tuple[float, ...]:
    """Per-image figures that each rank measured on its own images (batch mode: calls that may differ in
    cost, each rank its share) as one process's over all of them: weighted by the ranks' image counts."""
    everyone = gather_objects((tuple(values), images), group)
    total = sum(count for _, count in everyone)
    return tuple(sum(theirs[i] * count for theirs, count in everyone) / total for i in range(len(values)))


def merge_work(config: ParallelConfig, group: Group, runner: Any, warmup_macs: float, last: dict,
               last_index: int, n_calls: int, images: int) -> tuple[float, dict]:
    """The job's MACs as one process would count them: ``runner.macs`` / ``full_macs`` summed over
    ranks (set on ``runner``), the per-image warm-up MACs (``images``: this rank's), and the last
    call's work counters."""
    runner.macs, runner.full_macs = sum_ints([int(runner.macs), int(runner.full_macs)], group)
    if config.mode == "batch":  # every rank measured whole images, of its own calls: weighted by images
        everyone = gather_objects((last_index, last), group)
        pieces = [work for index, work in everyone if index == n_calls - 1]
        work = dict(pieces[0])
        for key in ("macs", "full_macs"):
            work[key] = sum(p[key] for p in pieces)
        return per_image_mean((warmup_macs,), images, group)[0], work
    warm = gather_objects(warmup_macs, group)
    work = dict(last)
    work["macs"], work["full_macs"] = sum_ints([last["macs"], last["full_macs"]], group)
    return float(sum(warm)), work
