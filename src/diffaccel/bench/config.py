"""What a bench run is asked for (``BenchConfig``), what each worker process is told (``BenchJob``),
and the calls every group runs: the same batches, seeds and settings for all of them."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffaccel.adapters import find_adapter_by_class
from diffaccel.bench import sweeps
from diffaccel.calibration.workload import Call, call_images
from diffaccel.errors import BenchError, DiffaccelError
from diffaccel.eval.io import write_json
from diffaccel.seeds import CALIBRATION_SEED, image_seed
from diffaccel.targets import read_prompts
from diffaccel.zoo import shapes
from diffaccel.zoo.models import MODEL_NAMES

PROGRESS = "@@progress"  # a worker's progress lines on stdout: "@@progress N"
PARENT_ENV = "DIFFACCEL_BENCH_PARENT"  # the bench's pid, in its workers' environment: they end with it
QUICK = {"per_class": 2, "batch_size": 4, "timed_pairs": None}  # 12 images, 3 interleaved batches, all timed
FULL = {"per_class": 100, "batch_size": 60, "timed_pairs": 5}  # 600 images (the protocol's FD minimum), 10 batches


@dataclass
class BenchConfig:
    model: str = "dit"  # an embedded model, or the name of the --pipeline folder
    quick: bool = False
    per_class: int | None = None  # images per class (embedded) or per prompt; default: QUICK or FULL
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
    pipeline: str | None = None  # a diffusers pipeline folder instead of an embedded model
    prompts: str | None = None  # with pipeline: its prompts file
    adherence: bool = False  # score prompt adherence with the t2i zoo's evaluator (its 64x64 caption language)
    tail: float | None = None  # the summary also bounds the 5th-percentile image's PSNR (dB); rows are unchanged
    extra: dict = field(default_factory=dict)

    def resolved(self) -> BenchConfig:
        preset = QUICK if self.quick else FULL
        out = BenchConfig(**asdict(self))
        for key in ("per_class", "batch_size", "timed_pairs"):  # None takes the preset; 0 is left to check_config
            setattr(out, key, preset[key] if getattr(self, key) is None else getattr(self, key))
        if self.pipeline is not None:
            out.model = Path(self.pipeline).name
        return out


@dataclass
class BenchJob:
    """One group's instructions to its worker process (written as JSON)."""

    group: str
    family: str
    entries: list[dict]
    target: dict  # {"model", "sampler", "weights"} or {"pipeline", "prompts"}
    steps: int
    guidance: float
    threads: int
    calls: list[dict]  # the held-out batches: {"kwargs": ..., "seeds": [...]}
    calib_calls: list[dict]  # calibration batches for peers that calibrate (MagCache, quanto)
    classes: list[int] | None  # embedded models: the class of every image comes from the calls
    grid_dir: str = ""
    grid_rows: int = 1
    grid_per_row: int = 8
    baseline_grid: str | None = None
    baseline_cache: str | None = None
    timed_pairs: int | None = None

    @property
    def sampler(self) -> str:
        return self.target.get("sampler", "pipeline")

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> BenchJob:
        return cls(**json.loads(Path(path).read_text()))


def adapter_of(cfg: BenchConfig) -> str:
    """The adapter name of the model benchmarked (the embedded models are named as their adapters),
    read from a pipeline folder's config files without loading weights."""
    if cfg.pipeline is None:
        return cfg.model
    folder = Path(cfg.pipeline)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise BenchError(f"{folder} is not a diffusers pipeline folder (no readable model_index.json)") from None
    for name in ("transformer", "unet"):
        entry = index.get(name)
        if isinstance(entry, list) and len(entry) == 2:
            adapter = find_adapter_by_class(entry[1])
            if adapter is not None:
                return adapter.name
            raise BenchError(f"diffaccel has no adapter for {entry[1]} (the {name} of {folder})")
    raise BenchError(f"found no transformer or unet in {folder}/model_index.json")


def check_prompt_images(path: Path) -> None:
    """The prompt file reads, every line making at least one image (``targets.read_prompts``): a line of
    none had failed every group, with torch's reshape error, after the whole run."""
    try:
        read_prompts(path)
    except DiffaccelError as exc:
        raise BenchError(str(exc)) from None


def check_config(cfg: BenchConfig) -> tuple[BenchConfig, dict[str, list[dict]]]:
    """Validate everything before any process starts; returns the resolved config and sweep."""
    if cfg.pipeline is None and cfg.model not in MODEL_NAMES:
        raise BenchError(f"unknown model {cfg.model!r}; choose one of {', '.join(MODEL_NAMES)}, or --pipeline PATH")
    if cfg.pipeline is not None and cfg.prompts is None:
        raise BenchError("--pipeline needs --prompts FILE: the prompts to benchmark on")
    if cfg.sampler not in ("ddim", "dpm"):
        raise BenchError(f"unknown sampler {cfg.sampler!r}; choose ddim or dpm")
    if cfg.prompts is not None:
        check_prompt_images(Path(cfg.prompts))
    cfg = cfg.resolved()
    for key in ("per_class", "batch_size", "steps", "threads", "timed_pairs"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise BenchError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    if cfg.steps == 1:  # (under leading spacing its one step even returns noise, and every row is compared to it)
        raise BenchError("--steps 1 leaves nothing to accelerate: a bench compares methods against a run of 2 or "
                         "more steps (default 50)")
    if cfg.classes is not None and (not cfg.classes or cfg.pipeline is not None):
        raise BenchError("--classes is empty" if not cfg.classes else "--classes is for the embedded models")
    try:
        shapes.class_ids(cfg.classes)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    kind = adapter_of(cfg)
    if cfg.sweep is not None:
        sweep = sweeps.validate(cfg.sweep, kind)
    else:
        sweep = sweeps.default_sweep(kind, cfg.sampler, cfg.steps, cfg.quick)
    if cfg.only:
        sweep = sweeps.only(sweep, cfg.only, kind)
    if not cfg.peers:
        sweep = {name: s for name, s in sweep.items() if sweeps.family_of(name) != "peer"}
        if not sweep:
            raise BenchError("the sweep is empty once peers are left out (--no-peers)")
    return cfg, sweep


def items(cfg: BenchConfig) -> dict:
    """The held-out batches and the calibration batches. Embedded models: labels round-robin over
    the classes (every batch holds every class), one calibration image per class. A pipeline folder:
    each prompt ``per_class`` times, one call per image."""
    if cfg.pipeline is None:
        ids = shapes.class_ids(cfg.classes)
        labels = [c for _ in range(cfg.per_class) for c in ids]
        seeds = [image_seed(cfg.seed, c, j) for j in range(cfg.per_class) for c in ids]
        common = {"num_inference_steps": cfg.steps, "guidance_scale": cfg.guidance}
        calls = [{"kwargs": {"class_labels": labels[i:i + cfg.batch_size], **common},
                  "seeds": seeds[i:i + cfg.batch_size]} for i in range(0, len(labels), cfg.batch_size)]
        calib_seeds = [image_seed(CALIBRATION_SEED, c, 0) for c in ids]
        calib = [{"kwargs": {"class_labels": ids, **common}, "seeds": calib_seeds}]
        return {"calls": calls, "calib_calls": calib, "classes": ids, "n_images": len(labels),
                "grid_rows": len(ids)}
    try:
        prompts = read_prompts(Path(cfg.prompts))
    except DiffaccelError as exc:
        raise BenchError(str(exc)) from None
    common = {"num_inference_steps": cfg.steps, "guidance_scale": cfg.guidance}
    calls = [{"kwargs": {**common, **prompt}, "seeds": [cfg.seed + k * len(prompts) + i]}
             for k in range(cfg.per_class) for i, prompt in enumerate(prompts)]
    calib = [{"kwargs": {**common, **prompt}, "seeds": [CALIBRATION_SEED + i]} for i, prompt in enumerate(prompts)]
    images = sum(call_images(Call(c["kwargs"], tuple(c["seeds"]))) for c in calls)  # num_images_per_prompt counts
    return {"calls": calls, "calib_calls": calib, "classes": None, "n_images": images, "grid_rows": len(prompts)}


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: this process is killed when the bench that started it dies, even by SIGKILL (an orphaned
    worker had gone on sampling for hours); ends at once if the bench is already gone."""
    parent = os.environ.get(PARENT_ENV)
    if sys.platform != "linux" or parent is None:
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(parent):  # it died before the line above
        os._exit(1)
