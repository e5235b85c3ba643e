"""The results file of ``diffaccel bench`` (``results.json``): its schema, summary and loading.

``format_version`` changes whenever a field changes meaning; ``diffaccel report`` refuses other
versions (and truncated or malformed files) with one line instead of drawing a wrong report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from diffaccel.errors import BenchError

FORMAT_VERSION = 1
PSNR_FLOOR = 30.0  # the headline: wall-clock speedup at mean PSNR >= this many dB
ADHERENCE_SLACK = 0.01  # t2i zoo models: the headline also keeps adherence within 1 point of the baseline

Family = Literal["diffaccel", "peer", "steps"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # a NaN figure is a broken file, not a rank


class PairedChange(_Model):
    """An evaluator score's change from the baseline on the same seeds (``eval/paired.py``)."""

    change: float
    low: float | None = None  # 95% interval; None from one image
    high: float | None = None
    se: float | None = None  # the change's standard error
    flips: int  # images whose verdict differs from the baseline image's


class Row(_Model):
    family: Family
    name: str
    setting: str
    settings: dict = {}
    sampler: str
    steps: int
    speedup_macs: float | None
    speedup_wall: float | None
    peak_mem_mb: float | None
    mem_over_baseline_mb: float | None = None
    psnr: float
    psnr_p5: float | None = None
    psnr_min: float | None = None
    ssim: float
    accuracy: float | None = None  # the embedded evaluator's (t2i zoo: the shape's); None on a pipeline folder
    adherence: float | None = None  # t2i zoo models: every attribute of the prompt read back
    paired: dict[str, PairedChange] = {}  # "accuracy" / "adherence": the change from the baseline's images
    fd: float | None
    fd_floor: float | None = None
    n_images: int
    wall_pairs: int
    seconds_per_image: float | None = None
    macs_per_image: int | None = None
    grid: str | None = None  # PNG, relative to the results file
    notes: str = ""


class Skipped(_Model):
    family: Family
    name: str
    setting: str | None = None  # None: every setting of the name
    reason: str


class Baseline(_Model):
    sampler: str
    steps: int
    guidance: float
    accuracy: float | None = None  # the embedded evaluator's (t2i zoo: the shape's); None on a pipeline folder
    adherence: float | None = None  # t2i zoo models: every attribute of the prompt read back
    fd: float | None
    fd_floor: float | None
    peak_mem_mb: float | None
    seconds_per_image: float
    macs_per_image: int
    sha256: str
    grid: str | None = None


class Best(_Model):
    family: Family
    speedup_wall: float | None  # None: no setting reaches the floor (or the name was skipped)
    speedup_macs: float | None = None
    psnr: float | None = None
    psnr_p5: float | None = None  # the 5th-percentile image's (results before it was recorded have none)
    setting: str | None = None
    note: str = ""


class Samples(_Model):
    """How many images each setting drew, and how the wall clock was timed."""

    n_images: int
    per_class: int | None = None  # None: a pipeline folder's prompts
    batch_size: int
    wall_pairs: int
    note: str = ""


class Results(_Model):
    format_version: int
    tool: str = "diffaccel bench"
    diffaccel_version: str
    created: str
    model: str
    config: dict
    machine: dict
    versions: dict
    threads: int
    samples: Samples
    baseline: Baseline
    rows: list[Row]
    skipped: list[Skipped]
    summary: dict[str, Best]
    psnr_floor: float = PSNR_FLOOR
    psnr_p5_floor: float | None = None  # the headline's bound on the 5th-percentile image, when one was given
    warnings: list[str] = []
    elapsed_s: float | None = None


def headline(floor: float, tail: float | None = None) -> str:
    """What a setting must reach to count in the summary, in words."""
    return f"PSNR >= {floor:g} dB" + ("" if tail is None else f" and 5th pct >= {tail:g} dB")


def meets_floor(row: dict, floor: float, baseline_adherence: float | None, tail: float | None = None) -> bool:
    """Mean PSNR >= ``floor``, the 5th-percentile image's >= ``tail`` when given, and, where
    adherence is scored, adherence within ADHERENCE_SLACK of the baseline's."""
    return row["psnr"] >= floor and not _held_back(row, baseline_adherence, tail)


def _held_back(row: dict, baseline_adherence: float | None, tail: float | None) -> str:
    """Why a row at the mean floor still does not count ("" when it does)."""
    if baseline_adherence is not None and (row.get("adherence") is None or
                                           row["adherence"] < baseline_adherence - ADHERENCE_SLACK - 1e-9):
        held = "not scored" if row.get("adherence") is None else f"{row['adherence']:.1%}"
        return f"adherence {held} against the baseline's {baseline_adherence:.1%}"
    if tail is not None and (row.get("psnr_p5") is None or row["psnr_p5"] < tail):
        return f"5th pct {'not recorded' if row.get('psnr_p5') is None else format(row['psnr_p5'], '.1f')} dB"
    return ""


def summarize(rows: list[dict], skipped: list[dict], floor: float = PSNR_FLOOR,
              baseline_adherence: float | None = None, tail: float | None = None) -> dict[str, dict]:
    """Each name's best wall-clock speedup among its settings with mean PSNR >= ``floor`` (the
    5th-percentile image's >= ``tail`` when given, and adherence within ADHERENCE_SLACK of
    ``baseline_adherence`` when it is scored)."""
    summary: dict[str, dict] = {}
    gate = headline(floor, tail)
    if baseline_adherence is not None:
        gate += f" with adherence within {ADHERENCE_SLACK * 100:g} pt of the baseline"
    mean_only: dict[str, dict] = {}  # the best row at the mean floor alone, to say what the other bounds held back
    for row in rows:
        entry = summary.setdefault(row["name"], {"family": row["family"], "speedup_wall": None,
                                                 "note": f"no setting reaches {gate}"})
        if row["speedup_wall"] is None or row["psnr"] < floor:
            continue
        if meets_floor(row, floor, baseline_adherence, tail):
            if entry["speedup_wall"] is None or row["speedup_wall"] > entry["speedup_wall"]:
                entry.update(speedup_wall=row["speedup_wall"], speedup_macs=row["speedup_macs"], psnr=row["psnr"],
                             psnr_p5=row.get("psnr_p5"), setting=row["setting"], note="")
        elif row["name"] not in mean_only or row["speedup_wall"] > mean_only[row["name"]]["speedup_wall"]:
            mean_only[row["name"]] = row
    for name, row in mean_only.items():
        if summary[name]["speedup_wall"] is None:
            summary[name]["note"] += (f" ({row['speedup_wall']:.2f}x at {row['psnr']:.1f} dB with {row['setting']}, "
                                      f"but {_held_back(row, baseline_adherence, tail)})")
    for item in skipped:
        if item["name"] not in summary:
            summary[item["name"]] = {"family": item["family"], "speedup_wall": None,
                                     "note": f"skipped: {item['reason']}"}
    return summary


def resummarized(results: Results, tail: float | None) -> Results:
    """``results`` with its summary ranked again under the 5th-percentile bound ``tail`` (None: the
    mean floor alone), from the rows it holds: no setting runs again."""
    rows = [r.model_dump() for r in results.rows]
    skipped = [x.model_dump() for x in results.skipped]
    summary = summarize(rows, skipped, results.psnr_floor, results.baseline.adherence, tail)
    return Results.model_validate({**results.model_dump(), "summary": summary, "psnr_p5_floor": tail})


def relocated(results: Results, source: Path, dest: Path) -> Results:
    """``results`` (read from folder ``source``) as a file in folder ``dest`` reads it: its grid
    paths, relative to the results file, rewritten to point at the same images."""
    def moved(grid: str | None) -> str | None:
        return None if grid is None else os.path.relpath(Path(source).resolve() / grid, Path(dest).resolve())

    data = results.model_dump()
    data["baseline"]["grid"] = moved(data["baseline"].get("grid"))
    for row in data["rows"]:
        row["grid"] = moved(row.get("grid"))
    return Results.model_validate(data)


def load_results(path: Path) -> Results:
    """Read and check a results file; every problem is a BenchError with one line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise BenchError(f"results file {path} does not exist") from None
    except IsADirectoryError:
        raise BenchError(f"{path} is a folder: give the results.json in it ({path / 'results.json'})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchError(f"cannot read results file {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchError(f"results file {path} is truncated or not valid JSON ({exc.msg} at line {exc.lineno}); "
                         "rerun `diffaccel bench`") from None
    if isinstance(data, dict) and data.get("model") == "dlm" and "rows" in data:
        raise BenchError(f"{path} is the language model's bench: its report is the results.md beside it "
                         "(`diffaccel report` renders the image benches)")
    if not isinstance(data, dict) or "format_version" not in data:
        partial = " (partial.json holds an unfinished run's rows: finish it with the same `diffaccel bench` " \
                  "command and --resume, which writes results.json)" if path.name == "partial.json" else ""
        raise BenchError(f"{path} is not a diffaccel bench results file (no format_version){partial}")
    if data["format_version"] != FORMAT_VERSION:
        raise BenchError(f"results file {path} has format_version {data['format_version']!r}, but this diffaccel "
                         f"reads format_version {FORMAT_VERSION}; rerun `diffaccel bench` to make a new one")
    try:
        return Results.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BenchError(f"results file {path} is incomplete or malformed: {where}: {first['msg']} "
                         f"({exc.error_count()} problem(s)); rerun `diffaccel bench`") from None
