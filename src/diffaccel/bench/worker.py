"""One benchmark group in its own process: ``python -m diffaccel.bench.worker JOB.json RESULT.json``.

A group is one peer (each peer gets a process of its own: some patch diffusers classes globally),
one of diffaccel's methods, or the step-count baselines. The worker loads the embedded model, runs
the unaccelerated baseline and every setting of the group on the same seeds, batch by batch
interleaved (baseline, setting 1, setting 2, ... for each batch), and writes one row per setting:

- MACs: counted with torch's FlopCounterMode (CPU attention registered by ``diffaccel.eval.cost``)
  around a run of the first batch, which is also the warm-up and is not timed; the ratio is the
  baseline's count over the setting's, for every family alike.
- wall clock: the median over batches of the baseline's time over the setting's time.
- the baseline: the first group of a run samples it on every batch and saves its images
  (``job["baseline_cache"]``, safetensors); later groups load them for the quality metrics and
  sample the baseline again only on the first ``job["timed_pairs"]`` batches, the interleaved
  timing pairs (and check that those images match the saved ones).
- peak memory: the process's peak resident set size during one untimed run of the first batch per
  setting, every setting opened, the memory the allocator keeps handed back before it (Linux resets
  the high-water mark), and its excess over the baseline's. The timed runs keep freed memory
  (``eval/allocator.py``): a serving process's steady state, where no run page-faults in what the
  one before it freed.
- PSNR/SSIM against the baseline images of this process, evaluator accuracy and Fréchet distance.

Progress goes to stdout as lines ``@@progress N``; everything else (peers' logs) is free text.
"""

from __future__ import annotations

import gc
import hashlib
import re
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffaccel.bench.candidates import open_candidate
from diffaccel.bench.config import PROGRESS, BenchJob, die_with_parent
from diffaccel.bench.peers import Context
from diffaccel.bench.scoring import paired, scorer
from diffaccel.bench.sweeps import setting_label
from diffaccel.calibration.workload import Call, call_images
from diffaccel.errors import BenchError
from diffaccel.eval.allocator import allocator_state, keep_freed_memory, release_freed_memory
from diffaccel.eval.cost import count_macs
from diffaccel.eval.fidelity import fidelity
from diffaccel.eval.io import write_json
from diffaccel.eval.timing import wall_ratio
from diffaccel.generate import save_grid
from diffaccel.steps import scheduler_like
from diffaccel.targets import load_pipeline_folder
from diffaccel.zoo.weights import load_pipeline


# -- memory ----------------------------------------------------------------------------------------------
def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    """Peak RSS since the last reset (Linux VmHWM), else the process's lifetime peak."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    except (OSError, AttributeError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _with_peak(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and the peak resident memory (MB) of its run alone (the kept memory handed back first)."""
    gc.collect()
    release_freed_memory()
    _reset_peak()
    out = fn()
    return out, _peak_mb()


def _measured(fn) -> tuple[torch.Tensor, float]:
    gc.collect()
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


class BadOutput(RuntimeError):
    """A candidate returned something else than one finite image per label."""


def _checked(images, n: int, like: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) != n:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise BadOutput(f"returned images of shape {shape} for {n} labels")
    if like is not None and images.shape[1:] != like.shape[1:]:
        raise BadOutput(f"returned images of shape {tuple(images.shape)}, the baseline {tuple(like.shape)}")
    if not torch.isfinite(images).all():
        raise BadOutput("returned non-finite images (NaN or infinity)")
    return images


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


# -- the shared baseline ----------------------------------------------------------------------------------


def _load_baseline(path: Path, n: int) -> torch.Tensor | None:
    """The first group's baseline images, or None when there are none yet (or they do not fit)."""
    if not path.exists():
        return None
    images = load_file(str(path)).get("images")
    return images if images is not None and len(images) == n else None


def _save_baseline(path: Path, images: torch.Tensor) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({"images": images.contiguous()}, str(tmp))
    tmp.replace(path)


# -- the group ----------------------------------------------------------------------------------------------
def _class_major(images: torch.Tensor, n_classes: int, per_row: int) -> torch.Tensor:
    """Images ordered round-robin over classes -> class by class, ``per_row`` of each."""
    per_class = len(images) // n_classes
    grid = images[: per_class * n_classes].reshape(per_class, n_classes, *images.shape[1:]).transpose(0, 1)
    return grid[:, :per_row].reshape(-1, *images.shape[1:])


def _save_grid(images: torch.Tensor, job: BenchJob, name: str) -> str:
    path = Path(job.grid_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(_class_major(images, job.grid_rows, job.grid_per_row), rows=job.grid_rows, path=path)
    return str(path)


def _pipelines(job: BenchJob):
    """``fresh_pipe(sampler=None)`` for the job's target: the embedded model with the named sampler,
    or the pipeline folder with its scheduler swapped for DDIM / DPM-Solver++ when one is named."""
    target = job.target

    def fresh_pipe(sampler: str | None = None):
        if "pipeline" not in target:
            weights = Path(target["weights"]) if target.get("weights") else None
            return load_pipeline(target["model"], sampler or target["sampler"], weights)
        pipe = load_pipeline_folder(Path(target["pipeline"]))
        if sampler is not None:
            pipe.scheduler = scheduler_like(pipe.scheduler, sampler)
        return pipe

    return fresh_pipe


def _open_all(job: BenchJob, ctx: Context, first: Call, progress) -> tuple[list[dict], list[dict]]:
    """Every setting of the group, opened and warmed up on the first call (its MACs counted)."""
    n_first = ctx.shared["n_first"]
    live, skipped = [], []
    for entry in job.entries:
        label = setting_label(entry["settings"])
        try:
            candidate = open_candidate(job.family, entry["name"], entry["settings"], ctx)
            macs = count_macs(lambda c=candidate: _checked((c.count or c.run)(first), n_first))  # warm-up, counted
            if candidate.count is not None:
                _checked(candidate.run(first), n_first)  # the warm-up
            live.append({"entry": entry, "label": label, "candidate": candidate, "macs": macs, "images": [],
                         "times": [], "peak": 0.0, "failed": None})
        except Exception as exc:  # a peer that cannot run this setting on this model: say why
            skipped.append({"family": job.family, "name": entry["name"], "setting": label, "reason": _reason(exc)})
            traceback.print_exc()
        progress(1)
    return live, skipped


def _peaks(first: Call, live: list[dict], base_run) -> float:
    """Each live setting's peak memory (into ``item["peak"]``) and the baseline's (returned), from one
    untimed run of the first call each, with every setting's pipeline loaded as in the timed runs."""
    base_peak = _with_peak(lambda: base_run(first))[1]
    for item in live:
        try:
            item["peak"] = _with_peak(lambda cand=item["candidate"]: cand.run(first))[1]
        except Exception as exc:
            item["failed"] = _reason(exc)
            traceback.print_exc()
    return base_peak


def _interleave(job: BenchJob, calls: list[Call], live: list[dict], base_run, cached, progress) -> dict:
    """Baseline and every live setting, call by call; the baseline timed on the first ``timed`` calls."""
    timed = len(calls) if cached is None else max(1, min(len(calls), int(job.timed_pairs or len(calls))))
    base_images, base_times, matches, start = [], [], True, 0
    for index, call in enumerate(calls):
        if index < timed:
            images, seconds = _measured(lambda c=call: base_run(c))
            base_times.append(seconds)
            if cached is not None:
                matches = matches and torch.equal(images, cached[start:start + len(images)])
        else:
            images = cached[start:start + call_images(call)]  # num_images_per_prompt, a list of prompts
        start += len(images)
        base_images.append(images)
        progress(1)
        for item in live:
            if item["failed"] is None:
                try:
                    out, seconds = _measured(lambda c=call, cand=item["candidate"]: cand.run(c))
                    _checked(out, len(images), images)
                    item["images"].append(out)
                    item["times"].append(seconds)
                except Exception as exc:
                    item["failed"] = _reason(exc)
                    traceback.print_exc()
            progress(1)
    return {"images": base_images, "times": base_times, "matches": matches, "timed": timed}


def _row(job: BenchJob, index: int, item: dict, reference: torch.Tensor, base: dict, base_macs: int,
         n_first: int, scores_of) -> dict:
    entry, candidate = item["entry"], item["candidate"]
    images = torch.cat(item["images"])
    quality = fidelity(images, reference)
    scores = scores_of(images)
    verdicts = scores.pop("verdicts")
    row = {
        "family": job.family, "name": entry["name"], "setting": item["label"], "settings": entry["settings"],
        "sampler": job.sampler, "steps": job.steps,
        "speedup_macs": base_macs / item["macs"] if item["macs"] else None,
        "speedup_wall": wall_ratio(base["times"], item["times"][:base["timed"]]),
        "peak_mem_mb": round(item["peak"], 1), "mem_over_baseline_mb": round(item["peak"] - base["peak"], 1),
        "psnr": quality["psnr"], "psnr_p5": quality["psnr_p5"], "psnr_min": quality["psnr_min"],
        "ssim": quality["ssim"], **scores, "paired": paired(verdicts, base["verdicts"]), "n_images": len(images),
        "wall_pairs": min(base["timed"], len(item["times"])),
        "seconds_per_image": sum(item["times"]) / len(images), "macs_per_image": item["macs"] // max(1, n_first),
        "grid": _save_grid(images, job, f"{job.group}-{index}"), "notes": candidate.notes,
    }
    if candidate.extra is not None:
        row.update(candidate.extra())
    return row


def _warm_up(pipe: Any, call: Call) -> tuple[int, int]:
    """The baseline's first (warm-up) run: its image count and its denoiser forwards, which the
    executor's MAC count of a plan at fewer steps is set against."""
    forwards = [0]
    handle = Context.denoiser(pipe).register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    try:
        return len(Context.sample(pipe, call)), forwards[0]
    finally:
        handle.remove()


def run_group(job: BenchJob, progress: Callable[[int], None] = lambda n: None) -> dict:
    """Run one group (see the module doc) and return ``{"baseline", "rows", "skipped"}``."""
    torch.set_num_threads(job.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    calls = [Call(c["kwargs"], tuple(c["seeds"])) for c in job.calls]
    fresh_pipe = _pipelines(job)
    embedded = "pipeline" not in job.target
    ctx = Context(model=job.target.get("model", "pipeline"), sampler=job.sampler, steps=job.steps,
                  guidance=job.guidance, fresh_pipe=fresh_pipe, embedded=embedded,
                  calib_calls=[Call(c["kwargs"], tuple(c["seeds"])) for c in job.calib_calls])
    base_pipe = fresh_pipe()
    scores_of = scorer(job, calls, embedded)

    first = calls[0]
    n_first, base_forwards = _warm_up(base_pipe, first)
    base_macs = count_macs(lambda: Context.sample(base_pipe, first))
    ctx.shared.update(base_pipe=base_pipe, n_first=n_first, base_forwards=base_forwards)
    progress(1)
    live, skipped = _open_all(job, ctx, first, progress)
    cache = Path(job.baseline_cache) if job.baseline_cache else None
    if call_images(first) != n_first:  # the count the cached baseline is sliced by must be the pipeline's
        raise BenchError(f"the first call made {n_first} images where its arguments ask for {call_images(first)}; "
                         "write one prompt (or class list) per line, without arguments that change the count")
    n_images = sum(call_images(c) for c in calls)
    cached = _load_baseline(cache, n_images) if cache is not None else None
    base_peak = _peaks(first, live, lambda c: Context.sample(base_pipe, c))
    base = _interleave(job, calls, live, lambda c: Context.sample(base_pipe, c), cached, progress)
    base["peak"] = base_peak
    reference = torch.cat(base["images"])
    if cache is not None and cached is None:
        _save_baseline(cache, reference)
    timed_images = sum(len(x) for x in base["images"][:base["timed"]])
    base_scores = scores_of(reference)
    base["verdicts"] = base_scores.pop("verdicts")
    baseline = {
        "sampler": job.sampler, "steps": job.steps, "guidance": job.guidance, **base_scores,
        "peak_mem_mb": round(base["peak"], 1), "seconds_per_image": sum(base["times"]) / timed_images,
        "macs_per_image": base_macs // max(1, n_first),
        "sha256": hashlib.sha256(reference.contiguous().numpy().tobytes()).hexdigest(),
        "allocator": allocator_state(),
        "from_cache": cached is not None, "matches_cache": base["matches"] if cached is not None else None,
    }
    if job.baseline_grid:
        baseline["grid"] = _save_grid(reference, job, job.baseline_grid)
    rows = []
    for index, item in enumerate(live):
        if item["failed"] is not None:
            skipped.append({"family": job.family, "name": item["entry"]["name"], "setting": item["label"],
                            "reason": item["failed"]})
            continue
        rows.append(_row(job, index, item, reference, base, base_macs, n_first, scores_of))
        try:
            item["candidate"].close()
        except Exception:  # closing is a courtesy: the process ends anyway
            traceback.print_exc()
    return {"baseline": baseline, "rows": rows, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m diffaccel.bench.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = BenchJob.load(Path(args[0]))

    def progress(n: int) -> None:
        sys.stdout.write(f"{PROGRESS} {n}\n")
        sys.stdout.flush()

    result = run_group(job, progress)
    write_json(Path(args[1]), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
