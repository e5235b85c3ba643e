"""``diffaccel bench``: every method, peer and fewer-step baseline on one embedded model, measured alike.

The sweep is split into groups (each of diffaccel's methods; each peer on its own; the step-count
baselines). Each group runs in a subprocess (``diffaccel.bench.worker``) with the same seeds,
sampler, guidance and thread count, and answers through JSON files: the job in, the rows out.
Progress lines on its stdout drive one progress bar. A peer that is not installed, cannot run a
setting, crashes or times out is listed under ``skipped`` with the reason.

Output in ``--out``: ``results.json``, ``results.md`` and ``report.html`` (written through temporary
files, and only once every group has finished), and ``run-<time>/`` with this run's grids, jobs
and worker logs (``partial.json`` there holds the rows so far while a run is going on).

The first group samples the baseline on every batch and saves its images in the run folder; the
others reuse them for quality and time the baseline only on ``timed_pairs`` interleaved batches.
``--resume`` continues the newest run of the same configuration in ``--out``: groups whose results
are on disk for the same settings are read back, not run again (a long run survives being killed,
and a sweep that gained entries runs only what is new). SIGTERM ends a bench as Ctrl-C does, its
running worker with it; on Linux a worker also dies with a bench killed outright.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import diffusers
import numpy
import torch
from tqdm import tqdm

import diffaccel
from diffaccel.bench import sweeps
from diffaccel.bench.config import PARENT_ENV, PROGRESS, BenchConfig, BenchJob, check_config, items
from diffaccel.bench.peers import PEERS, peer_versions
from diffaccel.bench.report import render_report, save_report
from diffaccel.bench.results import FORMAT_VERSION, PSNR_FLOOR, BenchError, Results, summarize
from diffaccel.bench.resume import find_resumable, finished_result, run_identity, saved_baseline_grid
from diffaccel.eval.io import write_json

FD_MIN_SAMPLES = 600


def plan_groups(sweep: dict[str, list[dict]], split_ours: bool = True) -> list[dict]:
    """Groups in run order: each of diffaccel's methods (or, without ``split_ours``, all of them in
    one process: fewer start-ups for a quick run), each peer, then the step baselines."""
    groups: list[dict] = []
    ours = [(n, s) for n, s in sweep.items() if sweeps.family_of(n) == "diffaccel"]
    if ours and not split_ours:
        groups.append({"group": "diffaccel", "family": "diffaccel",
                       "entries": [{"name": n, "settings": x} for n, settings in ours for x in settings]})
    for family in ("diffaccel", "peer") if split_ours else ("peer",):
        groups += [{"group": name, "family": family, "entries": [{"name": name, "settings": x} for x in settings]}
                   for name, settings in sweep.items() if sweeps.family_of(name) == family]
    steps = [(n, s) for n, s in sweep.items() if sweeps.family_of(n) == "steps"]
    if steps:
        groups.append({"group": "steps", "family": "steps",
                       "entries": [{"name": n, "settings": x} for n, settings in steps for x in settings]})
    return groups


def group_units(n_entries: int, n_batches: int) -> int:
    """Progress units of a group: warm-ups (baseline + each setting) and one per batch for the
    baseline (sampled or read back) and for each setting."""
    return 1 + n_entries + n_batches * (1 + n_entries)


def _machine() -> dict:
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
            "python": platform.python_version()}


def _versions() -> dict:
    return {"diffaccel": diffaccel.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "numpy": numpy.__version__, "peers": peer_versions()}


def _last_error(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if not line.startswith(PROGRESS) and ("Error" in line or "Exception" in line):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def _run_worker(job_path: Path, result_path: Path, log_path: Path, threads: int, timeout: float,
                bar: tqdm) -> tuple[dict | None, str | None, int]:
    """Start a worker, follow its progress lines, wait; returns (result, failure reason, units seen)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", PARENT_ENV: str(os.getpid())}
    seen = [0]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "diffaccel.bench.worker", str(job_path), str(result_path)],
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env)

        def pump() -> None:
            for line in proc.stdout:
                if line.startswith(PROGRESS):
                    n = int(line.split()[1])
                    seen[0] += n
                    bar.update(n)
                else:
                    log.write(line)
                    log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            reader.join(5)
            return None, f"timed out after {timeout:.0f} s (see {log_path})", seen[0]
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        reader.join(5)
    if proc.returncode != 0 or not result_path.exists():
        return None, f"worker failed (exit {proc.returncode}): {_last_error(log_path)} (see {log_path})", seen[0]
    return json.loads(result_path.read_text()), None, seen[0]


@contextlib.contextmanager
def sigterm_ends_the_run() -> Iterator[None]:
    """SIGTERM (kill, timeout, a job scheduler) ends the bench as Ctrl-C does, so the running worker is
    killed on the way out: Python's default had ended the bench alone, leaving its worker running."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def target_of(cfg: BenchConfig) -> dict:
    if cfg.pipeline is not None:
        return {"pipeline": str(Path(cfg.pipeline).resolve()), "prompts": str(Path(cfg.prompts).resolve()),
                "adherence": cfg.adherence}
    return {"model": cfg.model, "sampler": cfg.sampler, "weights": cfg.weights}


def _rel(path: str | None, root: Path) -> str | None:
    return None if path is None else os.path.relpath(path, root)


@dataclass
class Run:
    """A bench run under way: its folder, the groups' outcomes so far."""

    cfg: BenchConfig
    sweep: dict
    data: dict
    out: Path
    run_dir: Path
    log: Callable[[str], None] | None
    timed: int = 1
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    baseline: dict | None = None
    warnings: list[str] = field(default_factory=list)
    group_seconds: dict[str, float] = field(default_factory=dict)

    def say(self, line: str) -> None:
        if self.log:
            self.log(line)


def _start(cfg: BenchConfig, out: Path, log: Callable[[str], None] | None) -> Run:
    """Checked settings and the run folder: a new one, or with ``resume`` the run it continues."""
    cfg, sweep = check_config(cfg)
    data = items(cfg)
    identity = run_identity(cfg, sweep, data)
    run_dir = find_resumable(out, identity) if cfg.resume else None
    if run_dir is not None and log:
        log(f"resuming {run_dir}")
    elif cfg.resume and log:
        log(f"--resume: no run in {out} was started with these settings (model, sweep, images, steps, seed), so a "
            "new one starts")
    if run_dir is None:
        run_dir = out / f"run-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for sub in ("jobs", "logs", "grids"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", identity)
    n_batches = len(data["calls"])
    timed = n_batches if cfg.timed_pairs is None else min(n_batches, cfg.timed_pairs)
    return Run(cfg, sweep, data, out, run_dir, log, timed)


def _runnable(run: Run) -> list[dict]:
    """The groups to run; a peer that is not installed is skipped with the reason."""
    runnable = []
    for group in plan_groups(run.sweep, split_ours=not run.cfg.quick):
        reason = PEERS[group["group"]].available() if group["family"] == "peer" else None
        if reason is not None:
            run.skipped.append({"family": "peer", "name": group["group"], "setting": None, "reason": reason})
        else:
            runnable.append(group)
    if not runnable:
        raise BenchError("nothing to run: " + "; ".join(f"{s['name']}: {s['reason']}" for s in run.skipped))
    return runnable


def _group(run: Run, group: dict, bar: tqdm) -> None:
    """Run one group in its worker (or read back its result when resuming) and collect its rows."""
    cfg, data, started = run.cfg, run.data, time.time()
    job = BenchJob(group=group["group"], family=group["family"], entries=group["entries"], target=target_of(cfg),
                   steps=cfg.steps, guidance=cfg.guidance, threads=cfg.threads, calls=data["calls"],
                   calib_calls=data["calib_calls"], classes=data["classes"],
                   grid_dir=str((run.run_dir / "grids").resolve()), grid_rows=data["grid_rows"],
                   grid_per_row=cfg.grid_per_class, baseline_grid=None if run.baseline is not None else "baseline",
                   baseline_cache=str((run.run_dir / "baseline.safetensors").resolve()), timed_pairs=run.timed)
    job_path = run.run_dir / "jobs" / f"{group['group']}.json"
    result_path = run.run_dir / "jobs" / f"{group['group']}.result.json"
    result, failure, seen = finished_result(result_path, job_path, group["entries"]), None, 0
    if result is not None:  # --resume: this group finished in the run being continued
        run.say(f"{group['group']}: read back from {result_path}")
    else:
        job.save(job_path)
        result, failure, seen = _run_worker(job_path, result_path, run.run_dir / "logs" / f"{group['group']}.log",
                                            cfg.threads, cfg.group_timeout, bar)
        if result is not None:
            result["seconds"] = round(time.time() - started, 1)
            write_json(result_path, result)
    bar.update(max(0, group_units(len(group["entries"]), len(data["calls"])) - seen))
    run.group_seconds[group["group"]] = result.get("seconds") if result else round(time.time() - started, 1)
    if result is None:
        run.skipped.extend({"family": group["family"], "name": e["name"],
                            "setting": sweeps.setting_label(e["settings"]), "reason": failure}
                           for e in group["entries"])
        run.say(f"{group['group']}: {failure}")
        return
    _collect(run, group["group"], result)


def _collect(run: Run, name: str, result: dict) -> None:
    if run.baseline is None:
        run.baseline = result["baseline"]
        run.baseline["grid"] = _rel(run.baseline.get("grid") or saved_baseline_grid(run.run_dir), run.out)
    elif result["baseline"]["sha256"] != run.baseline["sha256"] or result["baseline"].get("matches_cache") is False:
        run.warnings.append(f"the baseline images of group {name} differ from the first group's "
                            "(sampling is not bit-exact between processes here)")
    for row in result["rows"]:
        row["grid"] = _rel(row.get("grid"), run.out)
        run.rows.append(row)
    run.skipped.extend(result["skipped"])
    write_json(run.run_dir / "partial.json", {"rows": run.rows, "skipped": run.skipped, "baseline": run.baseline})


def _record(run: Run, started: float) -> dict:
    cfg, n = run.cfg, run.data["n_images"]
    note = "" if n >= FD_MIN_SAMPLES else (
        f"Fréchet distances from {n} samples per side (fewer than the {FD_MIN_SAMPLES} the protocol asks for): "
        "indicative only" + (" (--quick)" if cfg.quick else ""))
    samples = {"n_images": n, "per_class": cfg.per_class, "classes": run.data["classes"],
               "batch_size": cfg.batch_size, "wall_pairs": run.timed, "fd_samples": n,
               "calibration_images": sum(len(c["seeds"]) for c in run.data["calib_calls"]), "quick": cfg.quick,
               "note": note, "macs": "FlopCounterMode over the first batch (warm-up run), baseline / setting",
               "wall": "median over batches of baseline time / setting time, interleaved in one process "
                       f"({run.timed} timed pairs per group; the first group times every batch)"}
    return {
        "format_version": FORMAT_VERSION, "tool": "diffaccel bench", "diffaccel_version": diffaccel.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": cfg.model,
        "config": {**asdict(cfg), "sweep": run.sweep, "run_dir": os.path.relpath(run.run_dir, run.out)},
        "machine": _machine(), "versions": _versions(), "threads": cfg.threads, "samples": samples,
        "baseline": run.baseline, "rows": run.rows, "skipped": run.skipped,
        "summary": summarize(run.rows, run.skipped, PSNR_FLOOR, (run.baseline or {}).get("adherence"), cfg.tail),
        "psnr_floor": PSNR_FLOOR, "psnr_p5_floor": cfg.tail,
        "warnings": run.warnings, "elapsed_s": round(time.time() - started, 1), "group_seconds": run.group_seconds,
    }


def run_bench(cfg: BenchConfig, out: Path, progress: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """Run the benchmark and write results.json, results.md and report.html into ``out``."""
    started = time.time()
    run = _start(cfg, Path(out), log)
    runnable = _runnable(run)
    total = sum(group_units(len(g["entries"]), len(run.data["calls"])) for g in runnable)
    bar = tqdm(total=total, desc=f"bench {run.cfg.model}", unit="run", disable=not progress, dynamic_ncols=True)
    try:
        with sigterm_ends_the_run():
            for group in runnable:
                bar.set_postfix_str(group["group"])
                _group(run, group, bar)
    finally:
        bar.close()
    if run.baseline is None:
        raise BenchError("every group failed; nothing to report: " +
                         "; ".join(f"{s['name']}: {s['reason']}" for s in run.skipped[:3]))
    results = Results.model_validate(_record(run, started))  # the schema diffaccel report reads back
    rendered = render_report(results, run.out)  # all of it in memory first: a failure replaces nothing
    path = run.out / "results.json"
    write_json(path, results.model_dump(mode="json"))
    save_report(run.out, rendered)
    for why in rendered.missing:
        run.say(f"warning: report.html is without a sample grid: {why}")
    return path
