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
- peak memory: the process's peak resident set size during the setting's runs (Linux resets the
  high-water mark before each run), and its excess over the baseline's.
- PSNR/SSIM against the baseline images of this process, evaluator accuracy and Fréchet distance.

Progress goes to stdout as lines ``@@progress N``; everything else (peers' logs) is free text.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
import resource
import sys
import time
import traceback
from pathlib import Path

import torch

from diffaccel.bench.runner import PROGRESS


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


def _measured(fn) -> tuple[torch.Tensor, float, float]:
    gc.collect()
    _reset_peak()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return out, seconds, _peak_mb()


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


def _finite(value: float) -> float | None:
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


# -- the shared baseline ----------------------------------------------------------------------------------
def _load_baseline(path: Path, n: int) -> torch.Tensor | None:
    """The first group's baseline images, or None when there are none yet (or they do not fit)."""
    from safetensors.torch import load_file

    if not path.exists():
        return None
    images = load_file(str(path)).get("images")
    return images if images is not None and len(images) == n else None


def _save_baseline(path: Path, images: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({"images": images.contiguous()}, str(tmp))
    tmp.replace(path)


# -- candidates ---------------------------------------------------------------------------------------------
def _ours(ctx, name: str, settings: dict):
    from diffaccel.adapters import find_denoiser
    from diffaccel.bench.peers import Candidate
    from diffaccel.methods.registry import METHODS, build
    from diffaccel.runtime.executor import Executor

    pipe = ctx.fresh_pipe()
    plan = build(name, pipe, ctx.steps, guidance=ctx.guidance, **settings)
    executor = Executor(find_denoiser(pipe)[0], plan)
    spent = {"macs": 0, "full_macs": 0}

    def run(labels, seeds):
        executor.install(pipe.scheduler)
        try:
            return ctx.sample(pipe, labels, seeds)
        finally:
            executor.remove()
            spent["macs"] += executor.stats.macs
            spent["full_macs"] += executor.stats.full_macs

    def extra():
        return {"speedup_macs_executor": spent["full_macs"] / spent["macs"] if spent["macs"] else None}

    notes = "plan calibrated on calibration seeds (not timed)" if METHODS[name].calibrated else ""
    return Candidate(run, notes=notes, extra=extra)


def _steps(ctx, name: str, settings: dict):
    from diffaccel.bench.peers import Candidate
    from diffaccel.bench.sweeps import STEP_KNOBS, STEP_NAMES

    steps = int({**STEP_KNOBS, **settings}["steps"])
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    pipe = ctx.fresh_pipe(sampler=STEP_NAMES[name])
    return Candidate(lambda labels, seeds: ctx.sample(pipe, labels, seeds, steps=steps),
                     notes=f"{STEP_NAMES[name]} at {steps} steps vs the {ctx.sampler} {ctx.steps}-step baseline")


def open_candidate(family: str, name: str, settings: dict, ctx):
    if family == "diffaccel":
        return _ours(ctx, name, settings)
    if family == "steps":
        return _steps(ctx, name, settings)
    from diffaccel.bench.peers import PEERS

    return PEERS[name].open(ctx, settings)


# -- the group ----------------------------------------------------------------------------------------------
def _class_major(images: torch.Tensor, n_classes: int, per_row: int) -> torch.Tensor:
    """Images ordered round-robin over classes -> class by class, ``per_row`` of each."""
    per_class = len(images) // n_classes
    grid = images[: per_class * n_classes].reshape(per_class, n_classes, *images.shape[1:]).transpose(0, 1)
    return grid[:, :per_row].reshape(-1, *images.shape[1:])


def _save_grid(images: torch.Tensor, job: dict, name: str) -> str:
    from diffaccel.generate import save_grid

    n_classes = len(job["classes"])
    path = Path(job["grid_dir"]) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(_class_major(images, n_classes, job["grid_per_class"]), rows=n_classes, path=path)
    return str(path)


def run_group(job: dict, progress=lambda n: None) -> dict:
    """Run one group (see the module doc) and return ``{"baseline", "rows", "skipped"}``."""
    import diffaccel.eval.cost  # noqa: F401  (registers the CPU attention FLOP formula)
    from diffaccel.bench.peers import Context
    from diffaccel.bench.sweeps import setting_label
    from diffaccel.eval.cost import count_macs
    from diffaccel.eval.fidelity import fidelity
    from diffaccel.eval.timing import wall_ratio
    from diffaccel.zoo.pipeline import sample
    from diffaccel.zoo.weights import load_evaluator, load_pipeline

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    labels = torch.tensor(job["labels"])
    seeds = list(job["seeds"])
    size = job["batch_size"]
    batches = [slice(i, i + size) for i in range(0, len(labels), size)]
    weights = Path(job["weights"]) if job.get("weights") else None

    def fresh_pipe(sampler: str | None = None):
        return load_pipeline(job["model"], sampler or job["sampler"], weights)

    ctx = Context(model=job["model"], sampler=job["sampler"], steps=job["steps"], guidance=job["guidance"],
                  fresh_pipe=fresh_pipe, calib_labels=torch.tensor(job["calib_labels"]),
                  calib_seeds=list(job["calib_seeds"]))
    base_pipe = fresh_pipe()
    evaluator = load_evaluator(Path(job["evaluator_weights"]) if job.get("evaluator_weights") else None)

    def base_run(batch: slice) -> torch.Tensor:
        return sample(base_pipe, labels[batch], seeds[batch], job["steps"], job["guidance"], batch_size=size)

    first = batches[0]
    n_first = len(labels[first])
    base_macs = count_macs(lambda: base_run(first))  # the baseline's warm-up, counted
    progress(1)

    live, skipped = [], []
    for entry in job["entries"]:
        label = setting_label(entry["settings"])
        try:
            candidate = open_candidate(job["family"], entry["name"], entry["settings"], ctx)
            macs = count_macs(  # the warm-up, counted
                lambda c=candidate: _checked((c.count or c.run)(labels[first], seeds[first]), n_first))
            if candidate.count is not None:
                _checked(candidate.run(labels[first], seeds[first]), n_first)  # the warm-up
            live.append({"entry": entry, "label": label, "candidate": candidate, "macs": macs, "images": [],
                         "times": [], "peak": 0.0, "failed": None})
        except Exception as exc:  # a peer that cannot run this setting on this model: say why
            skipped.append({"family": job["family"], "name": entry["name"], "setting": label, "reason": _reason(exc)})
            traceback.print_exc()
        progress(1)

    cache = Path(job["baseline_cache"]) if job.get("baseline_cache") else None
    cached = _load_baseline(cache, len(labels)) if cache is not None else None
    timed = len(batches) if cached is None else max(1, min(len(batches), int(job.get("timed_pairs") or len(batches))))
    base_images, base_times, base_peak, matches = [], [], 0.0, True
    for index, batch in enumerate(batches):
        if index < timed:
            images, seconds, peak = _measured(lambda b=batch: base_run(b))
            base_times.append(seconds)
            base_peak = max(base_peak, peak)
            if cached is not None:
                matches = matches and torch.equal(images, cached[batch])
        else:
            images = cached[batch]
        base_images.append(images)
        progress(1)
        for item in live:
            if item["failed"] is None:
                try:
                    images, seconds, peak = _measured(
                        lambda b=batch, c=item["candidate"]: c.run(labels[b], seeds[b]))
                    _checked(images, len(labels[batch]), base_images[-1])
                    item["images"].append(images)
                    item["times"].append(seconds)
                    item["peak"] = max(item["peak"], peak)
                except Exception as exc:
                    item["failed"] = _reason(exc)
                    traceback.print_exc()
            progress(1)

    reference = torch.cat(base_images)
    if cache is not None and cached is None:
        _save_baseline(cache, reference)
    base_scores = evaluator.score(reference, labels)
    timed_images = sum(len(labels[b]) for b in batches[:timed])
    baseline = {
        "sampler": job["sampler"], "steps": job["steps"], "guidance": job["guidance"],
        "accuracy": base_scores["accuracy"], "fd": _finite(base_scores["fd"]),
        "fd_floor": _finite(base_scores["fd_floor"]), "peak_mem_mb": round(base_peak, 1),
        "seconds_per_image": sum(base_times) / timed_images, "macs_per_image": base_macs // max(1, n_first),
        "sha256": hashlib.sha256(reference.contiguous().numpy().tobytes()).hexdigest(),
        "from_cache": cached is not None, "matches_cache": matches if cached is not None else None,
    }
    if job.get("baseline_grid"):
        baseline["grid"] = _save_grid(reference, job, job["baseline_grid"])

    rows = []
    for index, item in enumerate(live):
        entry, candidate = item["entry"], item["candidate"]
        if item["failed"] is not None:
            skipped.append({"family": job["family"], "name": entry["name"], "setting": item["label"],
                            "reason": item["failed"]})
            continue
        images = torch.cat(item["images"])
        quality = fidelity(images, reference)
        scores = evaluator.score(images, labels)
        row = {
            "family": job["family"], "name": entry["name"], "setting": item["label"], "settings": entry["settings"],
            "sampler": job["sampler"], "steps": job["steps"],
            "speedup_macs": base_macs / item["macs"] if item["macs"] else None,
            "speedup_wall": wall_ratio(base_times, item["times"][:timed]),
            "peak_mem_mb": round(item["peak"], 1), "mem_over_baseline_mb": round(item["peak"] - base_peak, 1),
            "psnr": quality["psnr"], "psnr_min": quality["psnr_min"], "ssim": quality["ssim"],
            "accuracy": scores["accuracy"], "fd": _finite(scores["fd"]), "fd_floor": _finite(scores["fd_floor"]),
            "n_images": len(images), "wall_pairs": min(timed, len(item["times"])),
            "seconds_per_image": sum(item["times"]) / len(images), "macs_per_image": item["macs"] // max(1, n_first),
            "grid": _save_grid(images, job, f"{job['group']}-{index}"), "notes": candidate.notes,
        }
        if candidate.extra is not None:
            row.update(candidate.extra())
        rows.append(row)
        try:
            candidate.close()
        except Exception:  # closing is a courtesy: the process ends anyway
            traceback.print_exc()
    return {"baseline": baseline, "rows": rows, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m diffaccel.bench.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(args[0]).read_text())

    def progress(n: int) -> None:
        sys.stdout.write(f"{PROGRESS} {n}\n")
        sys.stdout.flush()

    result = run_group(job, progress)
    out = Path(args[1])
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
