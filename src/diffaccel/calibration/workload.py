"""The calibration workload: the pipeline calls a method or the search runs to profile, fit or
calibrate, as data.

A ``Workload`` is a list of ``Call``s, each the keyword arguments of one pipeline call (``prompt``,
``prompt_embeds``, ``class_labels``, ``num_inference_steps``, ``guidance_scale``, ...) and its
noise seeds. Users pass their own calls (``calls=[{"prompt": p, "num_inference_steps": 28}]``);
the embedded pipelines provide a default one covering all their classes
(``pipe.workload_calls``). Nothing here assumes class labels or a pipeline class of ours: any
diffusers pipeline that takes ``generator`` (and returns images) runs.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from diffaccel.errors import DiffaccelError, WorkloadError, lost_peer, warn
from diffaccel.seeds import CALIBRATION_SEED, HELDOUT_SHIFT, shifted_seed

RESERVED = ("generator", "output_type", "return_dict")


@dataclass(frozen=True)
class Call:
    """One pipeline call: its keyword arguments, and one noise seed (one generator for the call) or
    one per image (a list of generators, as diffusers pipelines accept)."""

    kwargs: dict[str, Any]
    seeds: tuple[int, ...]

    def generators(self) -> torch.Generator | list[torch.Generator]:
        gens = [torch.Generator().manual_seed(int(s)) for s in self.seeds]
        return gens[0] if len(gens) == 1 else gens

    def run(self, pipe: Any, **extra: Any) -> torch.Tensor:
        """The call's images (see ``images_of``); an error of the pipeline on the call's arguments (its checks,
        a wrong type, an index out of the model's range) becomes a WorkloadError that names the call."""
        try:
            with torch.no_grad():
                return images_of(pipe(**self.kwargs, generator=self.generators(), **extra))
        except DiffaccelError:
            raise
        except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as exc:  # mostly the pipeline's
            # checks of its arguments, their types, or a value out of the model's range (a class id)
            if lost_peer(exc):  # a parallel split's collective: another rank died, not this call's fault
                raise
            raise WorkloadError(f"{type(pipe).__name__} failed on the call for {', '.join(self.describe())[:80]} "
                                f"(arguments: {', '.join(self.kwargs)}): {type(exc).__name__}: {exc}; check that "
                                "call's arguments") from exc

    def describe(self) -> list[str]:
        """The inputs this call asks for, readably (prompts or class ids)."""
        for key in ("prompt", "class_labels"):
            value = self.kwargs.get(key)
            if value is not None:
                values = value.tolist() if isinstance(value, torch.Tensor) else value
                return [str(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
        return ["<embeddings>"] if any(k.endswith("embeds") for k in self.kwargs) else ["<call>"]


def image_count(workload: Workload) -> int:
    """The images ``workload``'s calls make (``call_images`` of each)."""
    return sum(call_images(call) for call in workload.calls)


def call_images(call: Call) -> int:
    """The images one call makes: one per prompt, class label or embedding row (or seed), times
    ``num_images_per_prompt``."""
    embeds = call.kwargs.get("prompt_embeds")
    rows = embeds.shape[0] if isinstance(embeds, torch.Tensor) else len(call.describe())
    per_prompt = call.kwargs.get("num_images_per_prompt")
    return max(rows, len(call.seeds)) * (1 if per_prompt is None else int(per_prompt))


def images_of(result: Any) -> torch.Tensor:
    """A pipeline's output as a float tensor (N, C, H, W) in [0, 1], whatever its ``output_type``."""
    images = getattr(result, "images", result)
    if isinstance(images, tuple):
        images = images[0]
    if isinstance(images, list) and images and not isinstance(images[0], torch.Tensor):
        images = np.stack([np.asarray(im, dtype=np.float32) / (255.0 if not isinstance(im, np.ndarray) else 1.0)
                           for im in images])
    if isinstance(images, list) and images:
        images = torch.stack(images)
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
        if images.dim() == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
            images = images.permute(0, 3, 1, 2)  # NHWC (DiTPipeline, numpy output) -> NCHW
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        video = hasattr(result, "frames") and not hasattr(result, "images")
        raise WorkloadError(f"the pipeline returned no batch of images (got {type(images).__name__}); "
                            + ("calibrated methods and the search score images, not video frames: use a method "
                               "made without a calibration run (fora, first_block_cache, ...)" if video else
                               "it must return images, as diffusers pipelines do with output_type='pt'"))
    return images.detach().float().cpu()


def check_arguments(calls: Iterable[dict], pipe: Any) -> None:
    """Refuse call arguments that look like misspelt parameters of ``pipe`` (diffusers pipelines take
    ``**kwargs`` and would ignore them); other unknown ones warn, as the pipeline may ignore them."""
    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return
    named = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    catch_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for i, call in enumerate(calls):
        for key in call:
            if key in named or key == "seed":
                continue
            close = difflib.get_close_matches(key, named, 1, cutoff=0.75) or \
                [n for n in named if len(key) >= 4 and n.startswith(key)][:1]  # guidance -> guidance_scale
            if close or not catch_all:
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise WorkloadError(f"call {i} sets {key!r}, which {type(pipe).__name__} does not take{hint}")
            warn(f"call {i} sets {key!r}, which is no named argument of {type(pipe).__name__}: it goes to the "
                 "pipeline's **kwargs, which may ignore it")


def _accepts(pipe: Any, name: str) -> bool:
    params = inspect.signature(pipe.__call__).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@dataclass(frozen=True)
class Workload:
    calls: tuple[Call, ...]
    description: str = ""
    inputs: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.calls:
            raise WorkloadError("the workload is empty: give at least one pipeline call")

    @classmethod
    def from_calls(cls, calls: Iterable[dict | Call], seed: int = CALIBRATION_SEED,
                   description: str | None = None) -> Workload:
        """Calls as dicts of pipeline arguments; a ``seed`` key (an int, or a list: one per image)
        sets the noise, else call ``i`` gets seed ``seed + i``."""
        out = []
        for i, call in enumerate(calls):
            if isinstance(call, Call):
                out.append(call)
                continue
            if not isinstance(call, dict):
                raise WorkloadError(f"call {i} must be a dict of pipeline arguments, got {type(call).__name__}")
            kwargs = dict(call)
            given = kwargs.pop("seed", seed + i)
            bad = [k for k in RESERVED if k in kwargs]
            if bad:
                raise WorkloadError(f"call {i} sets {', '.join(bad)}: diffaccel sets these itself (give seeds "
                                    "with a 'seed' key instead of a generator)")
            seeds = tuple(given) if isinstance(given, (list, tuple)) else (given,)
            if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
                raise WorkloadError(f"call {i}'s seed must be a whole number >= 0 (or a list of them, one per image), "
                                    f"got {given!r}")
            out.append(Call(kwargs, seeds))
        calls = tuple(out)
        inputs = tuple(dict.fromkeys(x for c in calls for x in c.describe()))
        text = description or f"{len(calls)} calls, seeds from {seed}"
        return cls(calls, text, inputs)

    def __len__(self) -> int:
        return len(self.calls)

    @property
    def num_inference_steps(self) -> int | None:
        """The calls' common ``num_inference_steps`` (None if they leave it to the pipeline)."""
        steps = {c.kwargs.get("num_inference_steps") for c in self.calls}
        if len(steps) > 1:
            raise WorkloadError(f"the calls ask for different step counts ({sorted(map(str, steps))}): a plan is "
                                "made for one; give every call the same num_inference_steps (or calibrate each "
                                "step count on its own)")
        return steps.pop()

    def with_steps(self, num_inference_steps: int) -> Workload:
        calls = tuple(Call({**c.kwargs, "num_inference_steps": num_inference_steps}, c.seeds) for c in self.calls)
        return Workload(calls, self.description, self.inputs)

    def reseeded(self, shift: int = HELDOUT_SHIFT, description: str | None = None) -> Workload:
        """The same inputs with other noise (a held-out check of a plan fitted on this workload)."""
        calls = tuple(Call(c.kwargs, tuple(shifted_seed(s, shift) for s in c.seeds)) for c in self.calls)
        return Workload(calls, description or f"{self.description}, seeds shifted by {shift}", self.inputs)

    def repeated(self, times: int, shift: int, description: str) -> Workload:
        """``times`` copies of these calls, each with other noise: seeds shifted by ``shift``, and by
        the seeds' span once more for each copy (no two images share a seed)."""
        seeds = [s for call in self.calls for s in call.seeds] or [0]
        span = max(seeds) - min(seeds) + 1
        calls = tuple(Call(c.kwargs, tuple(shifted_seed(s, shift + k * span) for s in c.seeds))
                      for k in range(times) for c in self.calls)
        return Workload(calls, description, self.inputs)

    def fingerprint(self) -> str:
        """A short hash of every call's arguments and seeds: a stored search continues only on the same
        calls (a description such as "3 calls, seeds from N" does not tell prompts apart)."""
        digest = hashlib.sha256()
        for call in self.calls:
            for key in sorted(call.kwargs):
                digest.update(f"{key}={stable_text(call.kwargs[key])};".encode())
            digest.update(f"seeds={call.seeds}|".encode())
        return digest.hexdigest()[:16]

    def take(self, indices: Sequence[int]) -> Workload:
        return Workload(tuple(self.calls[i] for i in indices), self.description, self.inputs)

    def run(self, pipe: Any, progress: bool = False) -> torch.Tensor:
        """Run every call; the images, in order, as one tensor (N, C, H, W) in [0, 1]."""
        extra = {"output_type": "pt"} if _accepts(pipe, "output_type") else {}
        out = []
        quiet = not progress or len(self.calls) < 2
        for call in tqdm(self.calls, desc="calibration calls", disable=quiet):
            out.append(call.run(pipe, **extra))
        shapes = {tuple(x.shape[1:]) for x in out}
        if len(shapes) > 1:
            raise WorkloadError(f"the calls make images of different sizes ({sorted(shapes)}): use one size")
        return torch.cat(out)

    def __call__(self, pipe: Any) -> torch.Tensor:
        return self.run(pipe)


def stable_text(value: Any) -> str:
    """A call argument as text that is the same in every process: tensors by their bytes, not their ids."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        digest = hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy()).hexdigest()
        return f"tensor{tuple(data.shape)}{data.dtype}:{digest}"
    is_image = hasattr(value, "tobytes") and hasattr(value, "mode")  # a PIL image, whose repr is its address
    if (isinstance(value, np.ndarray) and value.dtype != object) or is_image:
        array = np.ascontiguousarray(np.asarray(value))  # repr summarizes a large array to its corners
        return f"array{array.shape}{array.dtype}:{hashlib.sha256(array.view(np.uint8).reshape(-1)).hexdigest()}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{stable_text(value[k])}" for k in sorted(value, key=str)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(stable_text(v) for v in value) + "]"
    return repr(value)


def as_workload(calls: Workload | Iterable[dict] | None, pipe: Any = None, **defaults: Any) -> Workload:
    """``calls`` as a Workload; None asks the pipeline for its default one (the embedded pipelines
    have one: ``pipe.workload_calls(**defaults)``), else says what to pass."""
    if isinstance(calls, Workload):
        return calls
    if calls is not None:
        calls = [calls] if isinstance(calls, dict) else list(calls)  # one call's arguments, or several calls
        if hasattr(pipe, "scheduler"):  # a pipeline (not a bare model): its arguments are known
            check_arguments([c for c in calls if isinstance(c, dict)], pipe)
        return Workload.from_calls(calls)
    make = getattr(pipe, "workload_calls", None)
    if make is None:
        raise WorkloadError(f"diffaccel cannot guess the inputs of a {type(pipe).__name__}: pass calls=[{{...}}], "
                            "the keyword arguments of the pipeline calls to calibrate on (prompts or class labels, "
                            "num_inference_steps, guidance_scale; CLI: --prompts FILE)")
    return make(**defaults)


def as_calibration(calls: Any, pipe: Any = None) -> Any:
    """A calibration set as the search takes it: a Workload or a callable ``run(pipe) -> images`` as
    given, pipeline calls (a list of argument dicts, or one) as a Workload; None stays None."""
    return calls if calls is None or callable(calls) else as_workload(calls, pipe)


def calibration_workload(calls: Workload | Iterable[dict] | None, pipe: Any = None, **defaults: Any) -> Workload:
    """``as_workload`` for calibrating a plan: its calls must share one step count (a plan is indexed
    by one run's steps; mixed counts failed mid-fit or built per-step scales of two trajectories) and
    one image size (the fits stack the calls' features)."""
    workload = as_workload(calls, pipe, **defaults)
    workload.num_inference_steps  # noqa: B018 -- raises when the calls differ
    sizes = {(c.kwargs.get("height"), c.kwargs.get("width")) for c in workload.calls}
    if len(sizes) > 1:
        raise WorkloadError(f"the calls ask for different image sizes (height, width: {sorted(sizes, key=str)}): "
                            "calibrate on one size")
    return workload
