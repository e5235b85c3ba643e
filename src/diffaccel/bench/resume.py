"""Continuing a killed bench run (``--resume``): which run folder to continue, and which groups in
it already finished with the same settings."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import diffaccel
from diffaccel.bench import sweeps
from diffaccel.bench.config import BenchConfig
from diffaccel.bench.results import FORMAT_VERSION


def run_identity(cfg: BenchConfig, sweep: dict, data: dict) -> dict:
    """What a resumed run must share with the run it continues (all but the sweep: each group is
    matched on its own settings)."""
    config = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "group_timeout", "sweep", "only",
                                                                 "peers", "tail")}
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


def finished_result(result_path: Path, job_path: Path, entries: list[dict]) -> dict | None:
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


def saved_baseline_grid(run_dir: Path) -> str | None:
    """The baseline grid that the run's first group saved: a resumed ``--only`` run may start with a
    group that was not the first, whose result carries no grid of its own."""
    path = run_dir / "grids" / "baseline.png"
    return str(path) if path.is_file() else None
