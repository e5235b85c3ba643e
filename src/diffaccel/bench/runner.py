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
and a sweep that gained entries runs only what is new).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from diffaccel.bench import sweeps
from diffaccel.bench.results import FORMAT_VERSION, PSNR_FLOOR, BenchError, Results, summarize
from diffaccel.seeds import CALIBRATION_SEED, image_seed
from diffaccel.zoo import shapes

PROGRESS = "@@progress"  # a worker's progress lines on stdout: "@@progress N"
QUICK = {"per_class": 2, "batch_size": 4, "timed_pairs": None}  # 12 images, 3 interleaved batches, all timed
FULL = {"per_class": 100, "batch_size": 60, "timed_pairs": 5}  # 600 images (the protocol's FD minimum), 10 batches
FD_MIN_SAMPLES = 600


@dataclass
class BenchConfig:
    model: str = "dit"
    quick: bool = False
    per_class: int | None = None  # default: QUICK or FULL
    batch_size: int | None = None
    steps: int = 50
    sampler: str = "ddim"
    guidance: float = 3.0
    seed: int = 100  # held-out noise seeds (calibration uses a disjoint range)
    threads: int = 1
    classes: list[str] | None = None
    sweep: dict | None = None  # name -> [settings]; default: sweeps.default_sweep
    only: list[str] | None = None
    peers: bool = True
    timed_pairs: int | None = None  # batches timed against the baseline (default: QUICK or FULL)
    resume: bool = False
    group_timeout: float = 6 * 3600.0
    grid_per_class: int = 8
    weights: str | None = None
    extra: dict = field(default_factory=dict)

    def resolved(self) -> BenchConfig:
        preset = QUICK if self.quick else FULL
        out = BenchConfig(**{**asdict(self)})
        out.per_class = self.per_class or preset["per_class"]
        out.batch_size = self.batch_size or preset["batch_size"]
        out.timed_pairs = self.timed_pairs or preset["timed_pairs"]
        return out


def check_config(cfg: BenchConfig) -> tuple[BenchConfig, dict[str, list[dict]]]:
    """Validate everything before any process starts; returns the resolved config and sweep."""
    from diffaccel.zoo import shapes
    from diffaccel.zoo.models import MODEL_NAMES

    if cfg.model not in MODEL_NAMES:
        raise BenchError(f"unknown model {cfg.model!r}; choose one of {', '.join(MODEL_NAMES)}")
    if cfg.sampler not in ("ddim", "dpm"):
        raise BenchError(f"unknown sampler {cfg.sampler!r}; choose ddim or dpm")
    cfg = cfg.resolved()
    for key in ("per_class", "batch_size", "steps", "threads", "timed_pairs"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise BenchError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    if cfg.classes is not None and not cfg.classes:
        raise BenchError(f"--classes is empty; choose from {', '.join(shapes.CLASSES)}")
    try:
        shapes.class_ids(cfg.classes)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    if cfg.sweep is not None:
        sweep = sweeps.validate(cfg.sweep, cfg.model)
    else:
        sweep = sweeps.default_sweep(cfg.model, cfg.sampler, cfg.steps, cfg.quick)
    if cfg.only:
        sweep = sweeps.only(sweep, cfg.only, cfg.model)
    if not cfg.peers:
        sweep = {name: s for name, s in sweep.items() if sweeps.family_of(name) != "peer"}
        if not sweep:
            raise BenchError("the sweep is empty once peers are left out (--no-peers)")
    return cfg, sweep


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


def items(cfg: BenchConfig) -> dict:
    """Labels and noise seeds, round-robin over classes (every batch holds every class), and one
    calibration image per class from the calibration seed range."""
    ids = shapes.class_ids(cfg.classes)
    return {
        "classes": ids,
        "labels": [c for _ in range(cfg.per_class) for c in ids],
        "seeds": [image_seed(cfg.seed, c, j) for j in range(cfg.per_class) for c in ids],
        "calib_labels": ids,
        "calib_seeds": [image_seed(CALIBRATION_SEED, c, 0) for c in ids],
    }


def _machine() -> dict:
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
            "python": platform.python_version()}


def _versions() -> dict:
    import diffusers
    import numpy
    import torch

    import diffaccel
    from diffaccel.bench.peers import peer_versions

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
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
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


def run_identity(cfg: BenchConfig, sweep: dict, data: dict) -> dict:
    """What a resumed run must share with the run it continues (all but the sweep: each group is
    matched on its own settings)."""
    import diffaccel

    config = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "group_timeout", "sweep", "only",
                                                                 "peers")}
    return {"diffaccel": diffaccel.__version__, "format_version": FORMAT_VERSION, "config": config,
            "items": data, "sweep": sweep}


def _same_run(saved: dict, identity: dict) -> bool:
    def key(record: dict) -> dict:
        record = json.loads(json.dumps(record))
        record.pop("sweep", None)
        for name in ("sweep", "only", "peers"):
            record.get("config", {}).pop(name, None)
        return record

    return key(saved) == key(identity)


def find_resumable(out: Path, identity: dict) -> Path | None:
    """The newest run folder in ``out`` started with the same configuration, if any."""
    for run_dir in sorted(out.glob("run-*"), reverse=True):
        try:
            if _same_run(json.loads((run_dir / "config.json").read_text()), identity):
                return run_dir
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
    return None


def _finished(result_path: Path, job_path: Path, entries: list[dict]) -> dict | None:
    """A group's saved result (a run being resumed) if it ran the same settings, else None."""
    try:
        result = json.loads(result_path.read_text())
        job = json.loads(job_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if job.get("entries") != json.loads(json.dumps(entries)):
        return None
    if not isinstance(result, dict) or not {"baseline", "rows", "skipped"} <= set(result):
        return None
    # The job file is written before its worker runs: a run killed then leaves a new job next to an
    # older result. Only a result with a row or a skip reason for every setting counts as finished.
    wanted = {(e["name"], sweeps.setting_label(e["settings"])) for e in entries}
    done = {(r.get("name"), r.get("setting")) for r in [*result["rows"], *result["skipped"]]}
    return result if wanted <= done else None


def _saved_baseline_grid(run_dir: Path) -> str | None:
    """The baseline grid that the run's first group saved: a resumed ``--only`` run may start with a
    group that was not the first, whose result carries no grid of its own."""
    path = run_dir / "grids" / "baseline.png"
    return str(path) if path.is_file() else None


def _rel(path: str | None, root: Path) -> str | None:
    return None if path is None else os.path.relpath(path, root)


def run_bench(cfg: BenchConfig, out: Path, progress: bool = True, log=None) -> Path:
    """Run the benchmark and write results.json, results.md and report.html into ``out``."""
    from diffaccel.bench.peers import PEERS
    from diffaccel.eval.io import write_json
    from diffaccel.report.html import render_report, save_report

    started = time.time()
    cfg, sweep = check_config(cfg)
    out = Path(out)
    data = items(cfg)
    identity = run_identity(cfg, sweep, data)
    run_dir = find_resumable(out, identity) if cfg.resume else None
    if run_dir is not None and log:
        log(f"resuming {run_dir}")
    if run_dir is None:
        run_dir = out / f"run-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for sub in ("jobs", "logs", "grids"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", identity)
    n_batches = -(-len(data["labels"]) // cfg.batch_size)
    groups = plan_groups(sweep, split_ours=not cfg.quick)

    skipped: list[dict] = []
    runnable = []
    for group in groups:
        if group["family"] == "peer":
            reason = PEERS[group["group"]].available()
            if reason is not None:
                skipped.append({"family": "peer", "name": group["group"], "setting": None, "reason": reason})
                continue
        runnable.append(group)
    if not runnable:
        raise BenchError("nothing to run: " + "; ".join(f"{s['name']}: {s['reason']}" for s in skipped))

    timed = n_batches if cfg.timed_pairs is None else min(n_batches, cfg.timed_pairs)
    total = sum(group_units(len(g["entries"]), n_batches) for g in runnable)
    bar = tqdm(total=total, desc=f"bench {cfg.model}", unit="run", disable=not progress, dynamic_ncols=True)
    rows: list[dict] = []
    baseline: dict | None = None
    warnings: list[str] = []
    group_seconds: dict[str, float] = {}
    try:
        for group in runnable:
            bar.set_postfix_str(group["group"])
            group_started = time.time()
            job = {**data, "group": group["group"], "family": group["family"], "entries": group["entries"],
                   "model": cfg.model, "sampler": cfg.sampler, "steps": cfg.steps, "guidance": cfg.guidance,
                   "threads": cfg.threads, "batch_size": cfg.batch_size, "weights": cfg.weights,
                   "grid_dir": str((run_dir / "grids").resolve()), "grid_per_class": cfg.grid_per_class,
                   "baseline_grid": None if baseline is not None else "baseline",
                   "baseline_cache": str((run_dir / "baseline.safetensors").resolve()), "timed_pairs": timed}
            job_path = run_dir / "jobs" / f"{group['group']}.json"
            result_path = run_dir / "jobs" / f"{group['group']}.result.json"
            result = _finished(result_path, job_path, group["entries"])
            if result is not None:  # --resume: this group finished in the run being continued
                failure, seen = None, 0
                if log:
                    log(f"{group['group']}: read back from {result_path}")
            else:
                write_json(job_path, job)
                result, failure, seen = _run_worker(job_path, result_path, run_dir / "logs" / f"{group['group']}.log",
                                                    cfg.threads, cfg.group_timeout, bar)
                if result is not None:
                    result["seconds"] = round(time.time() - group_started, 1)
                    write_json(result_path, result)
            bar.update(max(0, group_units(len(group["entries"]), n_batches) - seen))
            group_seconds[group["group"]] = result.get("seconds") if result else round(time.time() - group_started, 1)
            if result is None:
                skipped.extend({"family": group["family"], "name": e["name"],
                                "setting": sweeps.setting_label(e["settings"]), "reason": failure}
                               for e in group["entries"])
                if log:
                    log(f"{group['group']}: {failure}")
                continue
            if baseline is None:
                baseline = result["baseline"]
                baseline["grid"] = _rel(baseline.get("grid") or _saved_baseline_grid(run_dir), out)
            elif result["baseline"]["sha256"] != baseline["sha256"] or result["baseline"].get("matches_cache") is False:
                warnings.append(f"the baseline images of group {group['group']} differ from the first group's "
                                "(sampling is not bit-exact between processes here)")
            for row in result["rows"]:
                row["grid"] = _rel(row.get("grid"), out)
                rows.append(row)
            skipped.extend(result["skipped"])
            write_json(run_dir / "partial.json", {"rows": rows, "skipped": skipped, "baseline": baseline})
    finally:
        bar.close()
    if baseline is None:
        raise BenchError("every group failed; nothing to report: " +
                         "; ".join(f"{s['name']}: {s['reason']}" for s in skipped[:3]))

    n = len(data["labels"])
    note = "" if n >= FD_MIN_SAMPLES else (
        f"Fréchet distances from {n} samples per side (fewer than the {FD_MIN_SAMPLES} the protocol asks for): "
        "indicative only" + (" (--quick)" if cfg.quick else ""))
    record = {
        "format_version": FORMAT_VERSION, "tool": "diffaccel bench", "diffaccel_version": _versions()["diffaccel"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": cfg.model,
        "config": {**asdict(cfg), "sweep": sweep, "run_dir": os.path.relpath(run_dir, out)},
        "machine": _machine(), "versions": _versions(), "threads": cfg.threads,
        "samples": {"n_images": n, "per_class": cfg.per_class, "classes": data["classes"],
                    "batch_size": cfg.batch_size, "wall_pairs": timed, "fd_samples": n,
                    "calibration_images": len(data["calib_seeds"]), "quick": cfg.quick, "note": note,
                    "macs": "FlopCounterMode over the first batch (warm-up run), baseline / setting",
                    "wall": "median over batches of baseline time / setting time, interleaved in one process "
                            f"({timed} timed pairs per group; the first group times every batch)"},
        "baseline": baseline, "rows": rows, "skipped": skipped,
        "summary": summarize(rows, skipped, PSNR_FLOOR), "psnr_floor": PSNR_FLOOR,
        "warnings": warnings, "elapsed_s": round(time.time() - started, 1), "group_seconds": group_seconds,
    }
    results = Results.model_validate(record)  # the schema diffaccel report reads back
    rendered = render_report(results, out)  # all of it in memory first: a failure replaces nothing
    path = out / "results.json"
    write_json(path, results.model_dump(mode="json"))
    save_report(out, rendered)
    return path
