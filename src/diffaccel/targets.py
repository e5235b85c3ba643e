"""What a command runs on: an embedded model (``--model dit``), one of the text-to-image zoo's
pipelines (``--model pixart|sd``: stock diffusers pipelines with prompts of the caption language and
an evaluator of prompt adherence) or a user's pipeline folder with its prompts (``--pipeline PATH
--prompts FILE``), and the workloads built from it.

A ``Target`` knows how to make the calibration workload (noise from the calibration seed range,
for methods and the search) and the evaluation workload (noise from the user's seed, for
``generate`` and held-out checks) at a step count and guidance scale.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from diffaccel.adapters import adapter_for, find_denoiser
from diffaccel.calibration.workload import Workload, check_arguments
from diffaccel.errors import UnsupportedModelError, WeightsError, WorkloadError, warn
from diffaccel.seeds import CALIBRATION_SEED
from diffaccel.zoo import shapes
from diffaccel.zoo.t2i import captions
from diffaccel.zoo.t2i.evaluator import load_t2i_evaluator
from diffaccel.zoo.t2i.pipelines import PIPELINES, call_kwargs, load_t2i_pipeline, quiet_loading
from diffaccel.zoo.weights import WEIGHTS_DIR, load_evaluator, load_pipeline

T2I_MODELS = tuple(PIPELINES)  # pixart, sd
T2I_DEFAULT_PROMPTS = 12  # held-out evaluation prompts a t2i model runs when no --prompts is given


def read_prompts(path: Path) -> list[dict]:
    """One prompt per line, or JSON lines of pipeline call arguments (``{"prompt": ..., ...}``); blank
    lines and ``#`` comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is no prompt
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"cannot read the prompt file {path} ({exc}); give a text file with one prompt per "
                            "line") from None
    calls = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                call = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkloadError(f"{path}, line {number}: not valid JSON ({exc.msg}); write one prompt or one "
                                    "JSON object of pipeline arguments per line") from None
            if not isinstance(call, dict):
                raise WorkloadError(f"{path}, line {number}: a JSON line must be an object of pipeline arguments")
            for key in ("num_inference_steps", "num_images_per_prompt"):
                value = call.get(key, 1)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise WorkloadError(f"{path}, line {number}: {key} must be a whole number >= 1, got {value!r}")
            if call.get("prompt") == []:
                raise WorkloadError(f"{path}, line {number}: \"prompt\" is an empty list, which makes no image; give a "
                                    "prompt or a list of prompts")
            calls.append(call)
        elif line.startswith("[") and _is_json(line):
            raise WorkloadError(f"{path}, line {number}: a JSON line must be an object of pipeline arguments "
                                "({\"prompt\": ...}), not a list")
        else:
            calls.append({"prompt": line})
    if not calls:
        raise WorkloadError(f"the prompt file {path} holds no prompt; write one prompt per line")
    return calls


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def load_pipeline_folder(path: Path, dtype: str = "float32") -> Any:
    """A diffusers pipeline from a local folder (offline), with its denoiser checked."""
    folder = Path(path)
    if not folder.exists():
        raise WeightsError(f"the pipeline folder {folder} does not exist")
    if not (folder / "model_index.json").is_file():
        raise WeightsError(f"{folder} is not a diffusers pipeline folder (no model_index.json): give the folder "
                           "that DiffusionPipeline.save_pretrained wrote")
    pickled = sorted(d.name for d in folder.iterdir() if d.is_dir() and any(d.glob("*.bin"))
                     and not any(d.glob("*.safetensors")))
    if pickled:
        raise WeightsError(f"{folder} holds pickled weights (.bin) only for {', '.join(pickled)}, which diffaccel "
                           "does not load (a pickle can run code): save the pipeline with save_pretrained(..., "
                           "safe_serialization=True)")
    _check_components(folder)
    try:  # safetensors only; loaded as stored, then converted (the dtype argument's name changed in diffusers 0.40)
        with quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                     low_cpu_mem_usage=False).to(getattr(torch, dtype))
    except Exception as exc:  # diffusers raises many kinds for a damaged or foreign folder
        raise WeightsError(f"cannot load the pipeline in {folder}: {str(exc).splitlines()[0][:600].rstrip('.')}"
                           f"{_loading_hint(folder, str(exc))}") from None
    adapter_for(find_denoiser(pipe)[0])  # an unsupported denoiser is a one-line error now, not later
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _loading_hint(folder: Path, message: str) -> str:
    """What to do about two load failures diffusers words for its own developers."""
    if "were passed" in message and "expected" in message:
        return ("; the folder lacks components its pipeline class needs (text encoders, tokenizers): save the "
                "whole pipeline")
    name = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    if f"has no attribute {name}" in message:
        return (f"; {name} is not a diffusers class, and a folder loads diffusers pipelines only: load your "
                "pipeline in Python and use diffaccel.accelerate / diffaccel.find_plan on it")
    return ""


def _check_components(folder: Path) -> None:
    """Every component model_index.json lists has its folder (diffusers names the pipeline's folder, not
    the component's, when one is missing)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read {folder / 'model_index.json'}: {exc}") from None
    for name, entry in index.items() if isinstance(index, dict) else ():
        listed = isinstance(entry, list) and len(entry) == 2 and None not in entry
        if listed and not name.startswith("_") and not (folder / name).is_dir():
            raise WeightsError(f"{folder / 'model_index.json'} lists the component {name} ({entry[1]}), but the "
                               f"folder {folder / name} is missing: save the whole pipeline again")


@dataclass
class Target:
    name: str
    pipe: Any
    calls: list[dict] | None = None  # a user's prompts / call arguments; None for the embedded models
    weights: str | None = None  # where the weights came from (None: the shipped ones)
    evaluator: Any = None  # the embedded or t2i evaluator (accuracy / adherence, FD), None for other pipelines

    @property
    def embedded(self) -> bool:
        return self.calls is None

    def denoiser(self) -> tuple[Any, Any]:
        """``(denoiser, scheduler)`` of the pipeline."""
        return find_denoiser(self.pipe)

    def workload(self, steps: int, guidance: float, per_class: int = 2, seed: int = 0, calibration: bool = True,
                 classes: list[int] | None = None, batch_size: int = 64) -> Workload:
        """Calibration (``calibration=True``) or evaluation calls at ``steps`` and ``guidance``: every
        class of an embedded model ``per_class`` times, or each of the user's calls ``per_class`` times
        with its own noise (a call's own arguments win over these defaults)."""
        if self.embedded:
            return self.pipe.workload_calls(steps, guidance, per_class, seed, calibration, classes, batch_size)
        base = (CALIBRATION_SEED if calibration else 0) + seed
        calls = [{"num_inference_steps": steps, "guidance_scale": guidance, **call,
                  "seed": (base + _own_seed(call, i * per_class) + k) % 2**63}  # torch's generators take < 2**63
                 for i, call in enumerate(self.calls) for k in range(per_class)]
        kind = "calibration" if calibration else "evaluation"
        return Workload.from_calls(calls, description=f"{kind} seeds from {base}, {len(self.calls)} prompts x "
                                                      f"{per_class}, {_values(calls, 'num_inference_steps')} steps, "
                                                      f"guidance {_values(calls, 'guidance_scale')}")

    def judge(self) -> Callable[[torch.Tensor, Workload], torch.Tensor] | None:
        """The evaluator's verdict per image, for a search's judge budget (``search/judged.py``): its
        class read back (the embedded models), or every attribute of its prompt (the t2i zoo); None
        for a pipeline without an evaluator."""
        evaluator = self.evaluator
        if evaluator is None:
            return None
        if self.embedded:
            return lambda images, workload: evaluator.correct(images, class_labels(workload.calls))
        return lambda images, workload: prompt_verdicts(evaluator, images, list(workload.calls))["adherence"]

    def prompt_scores(self, images: torch.Tensor, calls: list) -> dict[str, float]:
        """A t2i model's scores of ``images``, drawn by ``calls`` in order (see :func:`prompt_scores`)."""
        return prompt_scores(self.evaluator, images, calls)


def _own_seed(call: dict, default: int) -> int:
    """A prompt line's own ``seed`` (kept apart between calibration and evaluation sets as the default
    seeds are: both are offsets from the set's base), else ``default``."""
    seed = call.get("seed", default)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise WorkloadError(f"a prompt line's seed must be a whole number >= 0, got {seed!r}")
    return seed


def _values(calls: list[dict], key: str) -> str:
    """The calls' values of ``key`` as a description says them: ``4``, or ``4/5`` when they differ."""
    return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in dict.fromkeys(c[key] for c in calls))


def prompt_scores(evaluator: Any, images: torch.Tensor, calls: list) -> dict[str, float]:
    """The t2i evaluator's adherence, per-attribute accuracy (``accuracy``: the shape's, as the embedded
    models' class accuracy) and Fréchet distance of ``images``, drawn by ``calls`` in order."""
    prompts = [prompt for call in calls for prompt in image_prompts(call)]
    scores = evaluator.score(images, prompts)
    return {"adherence": scores["adherence"], "accuracy": scores["accuracy_shape"], **scores}


def class_labels(calls: Sequence[Any]) -> torch.Tensor:
    """The class id of every image the embedded models' calls draw, in order."""
    return torch.tensor([int(c) for call in calls for c in call.kwargs["class_labels"]])


def prompt_verdicts(evaluator: Any, images: torch.Tensor, calls: list) -> dict[str, torch.Tensor]:
    """Per image of ``images`` (drawn by ``calls`` in order), whether the t2i evaluator reads back
    its shape (``accuracy``) and every attribute of its prompt (``adherence``)."""
    right = evaluator.correct(images, [prompt for call in calls for prompt in image_prompts(call)])
    return {"accuracy": right[:, 0], "adherence": right.all(1)}


def image_prompts(call: Any) -> list[str]:
    """The prompt of every image of one call (a call of one prompt and several seeds repeats it)."""
    prompts = call.describe()
    return prompts * len(call.seeds) if len(prompts) == 1 else prompts


def t2i_folder(model: str, weights: Path | None) -> Path:
    """The pipeline folder of a t2i zoo model: ``weights``, or the shipped one (an error says how to
    get one while it is not shipped)."""
    folder = Path(weights) if weights is not None else WEIGHTS_DIR / model
    if weights is None and not (folder / "model_index.json").is_file():
        raise WeightsError(f"the {model} pipeline is not shipped with this version of diffaccel (its training has not "
                           f"reached the quality bar yet): train one with `diffaccel train --model {model} --out "
                           f"runs/{model} --export DIR` and pass --weights DIR")
    return folder


def t2i_default_calls() -> list[dict]:
    """The held-out captions a t2i zoo model runs when no prompts are given."""
    return [{"prompt": captions.caption(a)} for a, _ in captions.items("eval", T2I_DEFAULT_PROMPTS)]


def _t2i_target(model: str, prompts: Path | None, sampler: str, weights: Path | None) -> Target:
    pipe = load_t2i_pipeline(model, sampler, t2i_folder(model, weights))
    calls = t2i_default_calls() if prompts is None else read_prompts(prompts)
    evaluator = load_t2i_evaluator() if in_caption_language(calls) else None
    calls = [{**call_kwargs(pipe), **call} for call in calls]
    check_arguments(calls, pipe)
    return Target(model, pipe, calls, str(weights) if weights else None, evaluator)


def in_caption_language(calls: list[dict]) -> bool:
    """Whether every call's prompt is a caption the t2i evaluator can score; warns at the first that
    is not, since the models were trained on those captions alone."""
    for number, call in enumerate(calls, 1):
        prompt = call.get("prompt")
        try:
            captions.parse_caption(prompt if isinstance(prompt, str) else "")
        except ValueError as exc:
            warn(f"prompt {number} is outside the caption language the t2i models know ({exc}): words they "
                 "do not know become <unk>, and adherence is not scored for this run")
            return False
    return True


def load_target(model: str | None = None, pipeline: Path | None = None, prompts: Path | None = None,
                sampler: str = "ddim", weights: Path | None = None) -> Target:
    """The embedded ``model`` (weights from ``weights`` if given), a t2i zoo model (``pixart``, ``sd``:
    the shipped folder or ``weights``; default prompts: held-out captions) or the ``pipeline`` folder
    with ``prompts``."""
    if pipeline is None and model in T2I_MODELS:
        return _t2i_target(model, prompts, sampler, weights)
    if pipeline is not None:
        if prompts is None:
            raise WorkloadError("--pipeline needs --prompts FILE: the prompts (or JSON lines of call arguments) "
                                "to run, calibrate and search on")
        calls = read_prompts(prompts)
        pipe = load_pipeline_folder(pipeline)
        check_arguments(calls, pipe)
        return Target(Path(pipeline).name, pipe, calls, str(pipeline))
    if prompts is not None:
        raise WorkloadError("--prompts goes with --pipeline or --model pixart|sd; the embedded models draw their "
                            "classes (--classes, where a command takes it)")
    pipe = load_pipeline(model or "dit", sampler, weights)
    return Target(model or "dit", pipe, None, str(weights) if weights else None, load_evaluator())


def class_ids(target: Target, names: list[str] | None) -> list[int]:
    """Class ids of ``names`` for an embedded target, checked against the loaded model's classes."""
    if not target.embedded:
        if names is not None:
            raise UnsupportedModelError(f"--classes is for the class-label models (dit, unet); the {target.name} "
                                        "pipeline runs the prompts of --prompts")
        return []
    ids = shapes.class_ids(names)
    if max(ids) >= target.pipe.num_classes:
        raise WeightsError(f"the loaded model has {target.pipe.num_classes} classes; class {max(ids)} "
                           f"({shapes.CLASSES[max(ids)]}) is not one of them")
    if target.pipe.num_classes != shapes.NUM_CLASSES:
        raise WeightsError(f"the weights in {target.weights} are a model of {target.pipe.num_classes} classes, not "
                           f"the {shapes.NUM_CLASSES} shapes classes the embedded evaluator reads: run it as a "
                           "pipeline folder (--pipeline PATH --prompts FILE of its class labels)")
    return ids
