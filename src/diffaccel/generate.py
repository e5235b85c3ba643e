"""The main job: run a target's evaluation calls (every requested class of an embedded model, or
the user's prompts), optionally under a plan and beside the unaccelerated pipeline, and score them.

Under a parallel mode (``diffaccel.parallel``: cfg, patch or batch) each process is one rank of the
initialised group; rank 0 writes the one record and grid a single process would write."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from diffaccel.calibration.reference import identity_plan
from diffaccel.calibration.workload import Call, call_images
from diffaccel.errors import WorkloadError
from diffaccel.eval.cost import count_macs
from diffaccel.eval.fidelity import fidelity
from diffaccel.eval.io import write_json
from diffaccel.eval.timing import wall_ratio
from diffaccel.parallel.agree import check_agreement
from diffaccel.parallel.errors import ParallelError
from diffaccel.parallel.exchange import gather_objects
from diffaccel.parallel.group import Group, alone, current
from diffaccel.parallel.job import ParallelConfig, check_job, merge_work, per_image_mean, split_denoiser
from diffaccel.parallel.shard import assemble, gather_times, shard
from diffaccel.plan import Plan
from diffaccel.runtime.executor import Executor
from diffaccel.targets import Target, class_ids
from diffaccel.zoo import shapes

log = logging.getLogger("diffaccel")


@dataclass
class GenerateConfig:
    classes: list[str] | None = None
    per_class: int = 8  # images per class (embedded models) or per prompt
    steps: int = 50
    sampler: str = "ddim"
    guidance: float = 3.0
    seed: int = 0
    batch_size: int = 64


def save_grid(images: torch.Tensor, rows: int | Sequence[int], path: Path, scale: int = 4) -> None:
    """Images (N, 3, H, W) in [0, 1] as one PNG, ``rows`` rows (one per class or prompt), upscaled."""
    img = Image.fromarray(grid_array(images, rows))
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


DIFFERENCE_GAIN = 10  # the side-by-side picture shows |accelerated - baseline| times this


def grid_array(images: torch.Tensor, rows: int | Sequence[int]) -> np.ndarray:
    """Images (N, 3, H, W) in [0, 1] as one HxWx3 uint8 array, ``rows`` rows (or as many rows as
    ``rows`` lists, each of that many images: prompts that draw different numbers), one-pixel white gaps."""
    n, _, h, w = images.shape
    counts = [-(-n // rows)] * rows if isinstance(rows, int) else list(rows)
    cols = max(counts)
    canvas = torch.ones(3, len(counts) * (h + 1) + 1, cols * (w + 1) + 1)
    cells = [(r, c) for r, count in enumerate(counts) for c in range(count)]
    for image, (r, c) in zip(images, cells, strict=False):
        canvas[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = image
    return (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_comparison(images: torch.Tensor, reference: torch.Tensor, rows: int | Sequence[int], path: Path,
                    scale: int = 4) -> None:
    """Baseline, accelerated and the amplified difference (grey levels, white where none) side by
    side, each labelled, as one PNG."""
    gray = ((images - reference).abs().mean(1, keepdim=True) * DIFFERENCE_GAIN).clamp(0, 1)
    panels = [("baseline", reference), ("accelerated", images),
              (f"|difference| x{DIFFERENCE_GAIN} (white: none)", (1 - gray).expand(-1, 3, -1, -1))]
    arrays = [Image.fromarray(grid_array(x, rows)) for _, x in panels]
    arrays = [a.resize((a.width * scale, a.height * scale), Image.NEAREST) for a in arrays]
    label_h, gap = 16, 8
    out = Image.new("RGB", (sum(a.width for a in arrays) + gap * (len(arrays) - 1), arrays[0].height + label_h),
                    "white")
    draw, x = ImageDraw.Draw(out), 0
    for (label, _), array in zip(panels, arrays):
        draw.text((x + 2, 2), label, fill="black")
        out.paste(array, (x, label_h))
        x += array.width + gap
    out.save(path)


def run_call(pipe: Any, call: Call) -> torch.Tensor:
    return call.run(pipe, output_type="pt")


class Runner:
    """Runs calls with and without the plan (installing the executor around each accelerated call),
    and adds up the plan's MACs."""

    def __init__(self, target: Target, plan: Plan | None):
        self.pipe = target.pipe
        model, self.scheduler = target.denoiser()
        # the plan maps onto the run's step count (resample), as the CLI promises and logs
        self.executor = Executor(model, plan or identity_plan(model), resample=True)
        self.macs = self.full_macs = 0

    def __call__(self, call: Call, accelerated: bool) -> torch.Tensor:
        if not accelerated:
            return run_call(self.pipe, call)
        self.executor.install(self.scheduler, self.pipe)
        try:
            images = run_call(self.pipe, call)
        finally:
            self.executor.remove()
        self.macs += self.executor.stats.macs
        self.full_macs += self.executor.stats.full_macs
        return images


def _timed(fn) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _sample(runner: Runner, calls: list[Call], plan: Plan | None, compare: bool, progress: bool) -> dict:
    """Every call, unaccelerated and/or under the plan, interleaved, after one discarded warm-up of each.
    With ``compare`` the warm-ups run under torch's FLOP counter: the MACs of each side's whole call (text encoder and
    decoder too, as ``bench`` counts them), so a plan that changes the sampler or its steps compares
    with the baseline's own run, not with the plan's forwards done in full."""
    per_image_full = 0.0
    call_macs = (0.0, 0.0) if plan is not None and compare else None
    groups = cost_groups(calls)
    total = sum(weight for _, weight in groups)
    for first, weight in groups:  # one discarded warm-up per kind of call (its steps, guidance, size): its MACs
        runner.macs = runner.full_macs = 0
        held: list = []

        def warm_up(call: Call = first, out: list = held) -> None:  # also measures the unit costs
            out.append(runner(call, accelerated=True))

        if call_macs is not None:
            plan_macs = count_macs(warm_up)
            base_macs = count_macs(lambda c=first: runner(c, accelerated=False))
            # per image: the baseline's whole call, and what the plan's call runs outside the denoiser
            share = weight / total / len(held[0])
            call_macs = (call_macs[0] + base_macs * share, call_macs[1] + (plan_macs - runner.macs) * share)
        else:
            warm_up()
        per_image_full += runner.full_macs * weight / total / len(held[0])
    runner.macs = runner.full_macs = 0
    fast, base, base_times, fast_times = [], [], [], []
    for call in tqdm(calls, desc="sampling", disable=not progress or len(calls) < 2):
        if compare or plan is None:
            images, seconds = _timed(lambda c=call: runner(c, accelerated=False))
            base.append(images)
            base_times.append(seconds)
        if plan is not None:
            images, seconds = _timed(lambda c=call: runner(c, accelerated=True))
            fast.append(images)
            fast_times.append(seconds)
    return {"fast": fast, "base": base, "base_times": base_times, "fast_times": fast_times,
            "warmup_macs": per_image_full,
            "call_macs": call_macs}


COST_ARGUMENTS = ("num_inference_steps", "guidance_scale", "height", "width", "true_cfg_scale")


def cost_groups(calls: list[Call]) -> list[tuple[Call, int]]:
    """The calls by what sets their cost per image (steps, guidance, size): the first of each kind and the
    images all of that kind make (a prompt file's lines may differ; the first line's cost had stood for all)."""
    groups: dict[tuple, list] = {}
    for call in calls:
        key = tuple(repr(call.kwargs.get(name)) for name in COST_ARGUMENTS)
        groups.setdefault(key, [call, 0])[1] += call_images(call)
    return [(first, weight) for first, weight in groups.values()]


def _concat(images: list[torch.Tensor]) -> torch.Tensor:
    if len({tuple(x.shape[1:]) for x in images}) > 1:
        raise WorkloadError("the calls make images of different sizes; give every prompt the same height and width")
    return torch.cat(images)


def _labels(calls: list[Call]) -> torch.Tensor:
    return torch.tensor([int(c) for call in calls for c in call.kwargs["class_labels"]])


def whole_call_macs(per_rank: list[tuple[float, float]]) -> tuple[float, float]:
    """One process's ``(baseline call, plan's work outside the denoiser)`` MACs per image from the
    ranks' own under a cfg or patch split: each rank counted its share of the denoiser and all of the
    rest (text encoder, decoder; the same in both calls: a plan changes the denoiser's work and the
    schedule), so the rest is counted once and the shares summed."""
    outside = per_rank[0][1]
    return sum(base for base, _ in per_rank) - (len(per_rank) - 1) * outside, outside


def _sample_parallel(runner: Runner, calls: list[Call], plan: Plan | None, compare: bool, progress: bool,
                     parallel: ParallelConfig | None, group: Group) -> dict:
    """``_sample`` as one rank of ``group``: the denoiser split (cfg, patch) or this rank's pieces of
    the calls (batch); the results merged into what one process would have (images on rank 0)."""
    if parallel is None:
        done = _sample(runner, calls, plan, compare, progress)
        done["work"] = runner.executor.stats.as_dict()
        return done
    pieces = shard(calls, group) if parallel.mode == "batch" else None
    mine = calls if pieces is None else [p.call for p in pieces]
    if not all(gather_objects(bool(mine), group)):
        count = sum(min(len(c.seeds), group.world) for c in calls)
        raise ParallelError(f"the job's {sum(call_images(c) for c in calls)} image(s) split into only {count} "
                            f"piece(s) for {group.world} ranks (a call splits by its seeds; the images of one seed, "
                            f"num_images_per_prompt, stay together): some ranks would have nothing to do; start at "
                            f"most {count} process(es)")
    with split_denoiser(parallel, group, runner.executor.model):
        done = _sample(runner, mine, plan, compare, progress)
    my_images = sum(call_images(c) for c in mine)
    if done["call_macs"] is not None:  # batch: each rank measured its own calls, whose costs may differ
        done["call_macs"] = per_image_mean(done["call_macs"], my_images, group) if parallel.mode == "batch" \
            else whole_call_macs(gather_objects(done["call_macs"], group))
    last = pieces[-1].index if pieces else len(calls) - 1
    done["warmup_macs"], done["work"] = merge_work(parallel, group, runner, done["warmup_macs"],
                                                   runner.executor.stats.as_dict(), last, len(calls), my_images)
    if pieces is not None:  # the plan as the job's last call ran it (mapped to its steps), wherever it ran
        done["plan_ran"] = dict(gather_objects((pieces[-1].index, runner.executor.plan), group))[len(calls) - 1]
        seconds = gather_objects((sum(done["base_times"]), sum(done["fast_times"])), group)
        done["seconds"] = [max(s[0] for s in seconds), max(s[1] for s in seconds)]
        for key in ("fast", "base"):
            done[key] = assemble(pieces, done[key], group, len(calls)) if done[key] else []
        for key in ("base_times", "fast_times"):
            done[key] = gather_times(pieces, done[key], group)
    return done


def run_generate(target: Target, cfg: GenerateConfig, out: Path, plan: Plan | None = None, compare: bool = False,
                 progress: bool = True, parallel: ParallelConfig | None = None) -> dict | None:
    """Generate and score; with a plan, run it (and with ``compare`` the unaccelerated pipeline too,
    call by call interleaved, after one discarded warm-up of each) and add fidelity and speed.

    ``parallel``: this process is one rank of the initialised group (``diffaccel.parallel.init``),
    every rank calls this with the same arguments; rank 0 writes and returns the record, the other
    ranks return None."""
    group = current()
    ids = class_ids(target, cfg.classes)
    workload = target.workload(cfg.steps, cfg.guidance, cfg.per_class, cfg.seed, calibration=False,
                               classes=ids or None, batch_size=cfg.batch_size)
    calls = list(workload.calls)
    if len({size for c in calls if None not in (size := (c.kwargs.get("height"), c.kwargs.get("width")))}) > 1:
        raise WorkloadError("the prompt lines make images of different sizes (one grid holds them): give every "
                            "line the same height and width")  # checked before sampling: _concat's is after
    runner = Runner(target, plan)
    check_job(parallel, group, runner.executor.model, plan)
    check_agreement(group, runner.executor.model, plan, {"config": asdict(cfg), "compare": compare, "parallel": None
                    if parallel is None else asdict(parallel)}, pipe=target.pipe, calls=calls)
    done = _sample_parallel(runner, calls, plan, compare, progress and group.main, parallel, group)
    if not group.main:
        return None
    with alone():  # rank 0 scores the images by itself
        record = _record(target, cfg, ids, calls, plan, compare, runner, done)
    if parallel is not None:
        record["parallel"] = parallel.describe(group)
    _write(out, record, _concat(done["fast"] if plan is not None else done["base"]),
           _concat(done["base"]) if compare and plan is not None else None,
           len(ids) if target.embedded else prompt_rows(calls, len(target.calls)))
    return record


def prompt_rows(calls: list[Call], prompts: int) -> list[int]:
    """The images of each prompt line (its calls come one after another), one grid row each."""
    per_prompt = len(calls) // prompts
    return [sum(call_images(c) for c in calls[i * per_prompt:(i + 1) * per_prompt]) for i in range(prompts)]


def per_call(calls: list[Call], key: str, default: Any) -> Any:
    """The calls' ``key`` (a call's own argument, else ``default``): one value, or the sorted values
    when the calls differ (a prompt file's lines may each set their steps or guidance)."""
    values = sorted({call.kwargs.get(key, default) for call in calls}, key=float)
    return values[0] if len(values) == 1 else values


def _record(target: Target, cfg: GenerateConfig, ids: list[int], calls: list[Call], plan: Plan | None,
            compare: bool, runner: Runner, done: dict) -> dict:
    main = _concat(done["fast"]) if plan is not None else _concat(done["base"])
    n = len(main)
    base_seconds, fast_seconds = done.get("seconds") or [sum(done["base_times"]), sum(done["fast_times"])]
    record = {
        "model": target.name, "weights": target.weights or "shipped",
        "sampler": cfg.sampler if target.embedded else type(target.pipe.scheduler).__name__,
        "steps": per_call(calls, "num_inference_steps", cfg.steps),
        "guidance": per_call(calls, "guidance_scale", cfg.guidance), "seed": cfg.seed, "per_class": cfg.per_class,
        "n_images": n,
        "macs_per_image": round(done["warmup_macs"]),
        "seconds": fast_seconds if plan is not None else base_seconds,
        "threads": torch.get_num_threads(),
    }
    if plan is not None and plan.solver is not None:  # the plan's sampler ran, at its own steps
        record.update(sampler=plan.solver.name, steps=plan.solver.steps, baseline_sampler=record["sampler"],
                      baseline_steps=record["steps"])
    if target.embedded:
        record["classes"] = [shapes.CLASSES[c] for c in ids]
        record.update(target.evaluator.score(main, _labels(calls)), fd_samples=n)
    else:
        record["prompts"] = [str(c.get("prompt", c)) for c in target.calls]
        if target.evaluator is not None:  # a t2i zoo model on prompts of its caption language
            record.update(target.prompt_scores(main, calls))
    if plan is not None:
        ran = done.get("plan_ran", runner.executor.plan)  # its last call's (batch: maybe another rank's, a copy)
        mapped = ran != plan and ran.params.get("resampled_from")
        record["plan"] = (ran if mapped else plan).model_dump(exclude_none=True)  # the plan that ran
        record["macs_per_image"] = round(runner.macs / n)
        # the executor's: the work its caching skipped, at the plan's own sampler and steps
        record["speedup_macs_executor"] = runner.full_macs / runner.macs
        if plan.solver is None:
            record["speedup_macs"] = record["speedup_macs_executor"]
        record["work"] = done["work"]
        if mapped:
            record["resampled_from"] = plan.num_steps
    if compare and plan is not None:
        reference = _concat(done["base"])
        record.update(fidelity(main, reference))
        record["speedup_wall"] = wall_ratio(done["base_times"], done["fast_times"])
        record["wall_pairs"] = len(done["base_times"])
        record["baseline"] = {"macs_per_image": round(runner.full_macs / n), "seconds": base_seconds}
        if done.get("call_macs"):  # whole calls, each at its own sampler and steps; the plan's denoiser
            base, outside = done["call_macs"]  # MACs over every call (a rule plan's work varies by call)
            record["macs_per_image"] = round(outside + runner.macs / n)
            record["speedup_macs"] = base / (outside + runner.macs / n)
            record["baseline"]["macs_per_image"] = round(base)
        if target.embedded:
            scores = target.evaluator.score(reference, _labels(calls))
            record["baseline"].update({k: scores[k] for k in ("accuracy", "fd") if k in scores})
        elif target.evaluator is not None:  # every score the accelerated images got (per attribute, fd_floor)
            record["baseline"].update(target.prompt_scores(reference, calls))
    return record


def _write(out: Path, record: dict, images: torch.Tensor, reference: torch.Tensor | None,
           rows: int | Sequence[int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_grid(images, rows=rows, path=out / "grid.png")
    if reference is not None:
        save_grid(reference, rows=rows, path=out / "grid_baseline.png")
        save_comparison(images, reference, rows, out / "comparison.png")
    else:  # an earlier --compare run's pictures would sit beside a record without a comparison
        for stale in ("grid_baseline.png", "comparison.png"):
            (out / stale).unlink(missing_ok=True)
    write_json(out / "record.json", record)
