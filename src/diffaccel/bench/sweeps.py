"""What ``diffaccel bench`` runs: every entry is a name (a diffaccel method, a peer or a step-count
baseline) with a list of settings, one row per setting.

A sweep is a mapping ``name -> [settings, ...]``; the default one per model is below, ``--quick``
keeps two settings of each, and ``--sweep FILE`` replaces it with a JSON file of the same shape.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffaccel.adapters import adapter_by_name
from diffaccel.bench.peers import PEERS
from diffaccel.errors import PlanError, SweepError
from diffaccel.methods.registry import METHODS, parameters
from diffaccel.plan import Plan
from diffaccel.solvers.flow import FLOW_SOLVERS

# a plan file (``{"plan": [{"file": "out/search/plan.json"}]}``): a searched plan beside the peers and
# the plain samplers in one run
PLAN_FILE = "plan"


def ptq_sweep(keys: int) -> list[dict]:
    """W4A8 (simulated: a quality row, slower than fp32 by design) and W8A8 on the fast int8 path,
    alone and with the key-step caching plan of ``keys`` steps. ``--quick`` keeps the two W8A8 rows;
    ``benchmarks/quant.py`` compares every backend and per-step scales at fewer images."""
    cache = {"method": "keysteps", "keys": keys}
    return [{"bits": "w4a8"}, {"bits": "w8a8", "backend": "int8-dynamic"}, {"bits": "w4a8", "cache": cache},
            {"bits": "w8a8", "backend": "int8-dynamic", "cache": cache}]


# Our methods, at least four settings of the main knob each.
OURS: dict[str, dict[str, list[dict]]] = {
    "dit": {
        "fora": [{"interval": 2}, {"interval": 3}, {"interval": 4}, {"interval": 5}],
        "taylorseer": [{"interval": 3, "order": 1}, {"interval": 4, "order": 2}, {"interval": 5, "order": 2},
                       {"interval": 6, "order": 2}],
        "first_block_cache": [{"threshold": 0.05}, {"threshold": 0.1}, {"threshold": 0.2}, {"threshold": 0.3}],
        "dbcache": [{"threshold": 0.1}, {"threshold": 0.2}, {"threshold": 0.2, "forecast_order": 1},
                    {"threshold": 0.3, "forecast_order": 1}],
        "erta": [{"threshold": 0.1}, {"threshold": 0.2}, {"threshold": 0.3}, {"threshold": 0.4}],
        "keysteps": [{"keys": 10}, {"keys": 12}, {"keys": 14}, {"keys": 16}, {"keys": 12, "correct": True}],
        "ptq": ptq_sweep(14),
    },
    "unet": {
        "deepcache": [{"interval": 2}, {"interval": 3}, {"interval": 4}, {"interval": 5}],
        "faster_diffusion": [{"interval": 2}, {"interval": 3}, {"interval": 4}, {"interval": 5}],
        "fora": [{"interval": 2}, {"interval": 3}, {"interval": 4}, {"interval": 5}],
        "taylorseer": [{"interval": 3, "order": 1}, {"interval": 4, "order": 2}, {"interval": 5, "order": 2},
                       {"interval": 6, "order": 2}],
        "erta": [{"threshold": 0.1}, {"threshold": 0.2}, {"threshold": 0.3}, {"threshold": 0.4}],
        "keysteps": [{"keys": 8}, {"keys": 10}, {"keys": 12}, {"keys": 14}],  # correct=True gains ~0 dB here
        "ptq": ptq_sweep(10),
    },
}


def quant_peer_sweeps(keys: int) -> dict[str, list[dict]]:
    """torchao and optimum-quanto int8, each alone and with our key-step plan of ``keys`` steps."""
    return {
        "torchao": [{"config": "int8-weight-only"}, {"config": "int8-dynamic"},
                    {"config": "int8-weight-only", "cache_keys": keys}, {"config": "int8-dynamic", "cache_keys": keys}],
        "quanto": [{"weights": "qint8"}, {"weights": "qint8", "cache_keys": keys}],
    }


# Peers (see diffaccel.bench.peers for what each name runs), at a sweep of their own main knob.
PEER_SWEEPS: dict[str, dict[str, list[dict]]] = {
    "dit": {
        "diffusers-fbc": [{"threshold": 0.05}, {"threshold": 0.1}, {"threshold": 0.2}, {"threshold": 0.3}],
        "diffusers-taylorseer": [{"interval": 2}, {"interval": 3}, {"interval": 4}, {"interval": 5}],
        "diffusers-pab": [{"skip_range": 2}, {"skip_range": 3}, {"skip_range": 4},
                          {"skip_range": 3, "timestep_range": [0, 1000]}],
        "diffusers-fastercache": [{"skip_range": 2}, {"skip_range": 3}, {"skip_range": 4}, {"skip_range": 5}],
        # at its default max_skip_steps=3 and retention_ratio=0.2 MagCache stops at 2.5x MACs (20 of 50
        # steps computed) while still above 36 dB: the last settings lift that cap to find its 30 dB point
        "diffusers-magcache": [{"threshold": 0.12}, {"threshold": 0.24}, {"threshold": 0.24, "max_skip_steps": 6},
                               {"threshold": 0.5, "max_skip_steps": 6},
                               {"threshold": 1.0, "max_skip_steps": 10, "retention_ratio": 0.1}],
        "cachedit-dbcache": [{"threshold": 0.05}, {"threshold": 0.1}, {"threshold": 0.2}, {"threshold": 0.3}],
        "cachedit-dbcache-taylorseer": [{"threshold": 0.1}, {"threshold": 0.2}, {"threshold": 0.3},
                                        {"threshold": 0.4}],
        **quant_peer_sweeps(14),
    },
    "unet": {
        "deepcache-sdhelper": [{"interval": 2}, {"interval": 3}, {"interval": 4}, {"interval": 5}],
        "tgate": [{"gate_step": 10}, {"gate_step": 20}, {"gate_step": 30}, {"gate_step": 40}],
        "tomesd": [{"ratio": 0.25}, {"ratio": 0.5}, {"ratio": 0.75}, {"ratio": 0.5, "max_downsample": 4}],
        **quant_peer_sweeps(10),
    },
}

# Fewer-step baselines: the same sampler at fewer steps, and the other sampler (DPM-Solver++).
# the plain samplers at fewer steps, each run as a plan's solver section (any betas pipeline)
STEP_NAMES = {"steps-ddim": "ddim", "steps-dpm": "dpm++2", "steps-unipc": "unipc", "steps-evodiff": "evodiff"}
STEP_COUNTS = {"steps-ddim": (10, 20, 30), "steps-dpm": (8, 10, 15, 20), "steps-unipc": (6, 8, 10, 15),
               "steps-evodiff": (8, 10, 15, 20)}
STEP_KNOBS = {"steps": 20}


@dataclass(frozen=True)
class Entry:
    """What a sweep knows of one name: the family of its rows, the settings it accepts (with their
    defaults), whether it applies to a model kind, and a check of one setting beyond its knob names."""

    family: str
    knobs: dict[str, object]
    applies: Callable[[str], bool]
    check: Callable[[dict, str, str], None] = lambda setting, source, model: None


def entry(name: str) -> Entry:
    """The sweep's view of a name: a plan file, one of our methods, a peer or a step baseline."""
    if name == PLAN_FILE:  # the executor checks the plan's units against the model
        return Entry("diffaccel", {"file": None}, lambda model: True, _check_plan_file)
    if name in METHODS:  # the embedded models are named as their adapters
        return Entry("diffaccel", parameters(name), lambda model: METHODS[name].applies(adapter_by_name(model)))
    if name in PEERS:
        return Entry("peer", dict(PEERS[name].knobs), lambda model: model in PEERS[name].models,
                     lambda setting, source, model: _check_peer_setting(name, setting, source))
    if name in STEP_NAMES:  # a flow-matching model runs the samplers of solvers/flow.py
        return Entry("steps", dict(STEP_KNOBS), lambda model: STEP_NAMES[name] in FLOW_SOLVERS
                     or "flow-matching" not in adapter_by_name(model).capabilities)
    raise SweepError(f"unknown method or peer {name!r}")


def family_of(name: str) -> str:
    return entry(name).family


def step_sweep(sampler: str, steps: int, quick: bool) -> dict[str, list[dict]]:
    """DDIM, DPM-Solver++, UniPC and EVODiff at step counts below the baseline's (the first thing a
    user would try instead of an accelerator); ``--quick`` keeps two counts of each."""
    sweep = {}
    for name, counts in STEP_COUNTS.items():
        kept = [n for n in counts if n < steps] or [max(1, steps // 2)]
        sweep[name] = [{"steps": n} for n in (kept[::max(1, len(kept) - 1)] if quick else kept)]
    return sweep


def kind_of(model: str) -> str:
    """The default sweep a model kind (an adapter name: dit, pixart, sd3, flux, unet) takes."""

    try:
        adapter = adapter_by_name(model)
    except ValueError:
        raise SweepError(f"unknown model kind {model!r}; choose one of {', '.join(OURS)}") from None
    return "unet" if "skip-branches" in adapter.capabilities else "dit"


def default_sweep(model: str, sampler: str = "ddim", steps: int = 50, quick: bool = False) -> dict[str, list[dict]]:
    """Our methods, the peers that apply to the model kind and the step baselines."""
    kind = kind_of(model)
    every_peer = {**PEER_SWEEPS["dit"], **PEER_SWEEPS["unet"], **PEER_SWEEPS[kind]}
    peers = {name: every_peer[name] for name in PEERS if name in every_peer and applies_to(name, model)}
    fewer = {name: s for name, s in step_sweep(sampler, steps, quick).items() if applies_to(name, model)}
    sweep = {**{name: _scaled_to(settings, steps) for name, settings in {**OURS[kind], **peers}.items()}, **fewer}
    if quick:  # two settings of each: a mild one and the most aggressive one
        sweep = {name: settings if name in STEP_NAMES or len(settings) <= 2 else [settings[1], settings[-1]]
                 for name, settings in sweep.items()}
    return sweep


# settings counted in steps of the run, written for 50 steps: key steps (ours, and the quantization peers'
# key-step plan) and T-GATE's step after which guidance stops
STEP_COUNTED = ("keys", "cache_keys", "gate_step")


def _scaled_to(settings: list[dict], steps: int) -> list[dict]:
    """The step-counted settings (``STEP_COUNTED``, also inside a quantized row's ``cache``), written
    for 50 steps, scaled to ``steps`` and kept below it (at 10 steps, 12 keys of 50 had refused the
    whole family, and a gate_step of 10 or more never gated); repeats dropped."""
    def scaled(one: dict) -> dict:
        if "cache" in one and isinstance(one["cache"], dict):
            one = {**one, "cache": scaled(one["cache"])}
        if steps == 50:
            return one
        return {**one, **{knob: min(max(1, round(one[knob] * steps / 50)), max(1, steps - 1))
                          for knob in STEP_COUNTED if isinstance(one.get(knob), int)}}
    kept = [scaled(one) for one in settings]
    return [one for i, one in enumerate(kept) if one not in kept[:i]]


def applies_to(name: str, model: str) -> bool:
    return entry(name).applies(model)


def validate(sweep: object, model: str, source: str = "the sweep") -> dict[str, list[dict]]:
    """Check a sweep for a model: known names that apply to it, non-empty lists of settings dicts with
    known knobs. Returns it as a plain dict; raises SweepError with one line otherwise."""
    if not isinstance(sweep, dict):
        raise SweepError(f"{source} must be a JSON object mapping names to lists of settings")
    if not sweep:
        raise SweepError(f"{source} is empty: name at least one method, peer or steps baseline")
    for name, settings in sweep.items():
        try:
            spec = entry(name)
        except SweepError:
            kind_of(model)  # an unknown model kind says so first
            valid = sorted(n for n in {*METHODS, *PEERS, *STEP_NAMES, PLAN_FILE} if applies_to(n, model))
            raise SweepError(f"{source}: unknown method or peer {name!r}; for the {model} choose from "
                             f"{', '.join(valid)}") from None
        if not spec.applies(model):
            raise SweepError(f"{source}: {name} does not apply to the {model} model")
        if not isinstance(settings, list) or not settings:
            what = "has an empty sweep" if settings in ([], None) else f"takes a list of settings, got {settings!r}"
            raise SweepError(f"{source}: {name} {what}; give a list of at least one settings object, e.g. "
                             f"[{json.dumps({k: v for k, v in list(spec.knobs.items())[:1]})}]")
        allowed = spec.knobs
        if any(setting in settings[:i] for i, setting in enumerate(settings)):
            raise SweepError(f"{source}: {name} lists a setting twice (two rows of one label); list each once")
        for setting in settings:
            if not isinstance(setting, dict):
                raise SweepError(f"{source}: each setting of {name} must be an object, got {setting!r}")
            unknown = sorted(set(setting) - set(allowed))
            if unknown:
                raise SweepError(f"{source}: {name} has no setting {', '.join(unknown)}; "
                                 f"its settings are {', '.join(allowed) or '(none)'}")
            _check_types(name, setting, allowed, source)
            spec.check(setting, source, model)
    return {name: [_whole_as_int(s, entry(name).knobs) for s in settings] for name, settings in sweep.items()}


# settings without a numeric default that take a whole number when given
WHOLE_WITHOUT_DEFAULT = ("cache_keys",)


def _is_whole_knob(knob: str, default: object) -> bool:
    return knob in WHOLE_WITHOUT_DEFAULT or (isinstance(default, int) and not isinstance(default, bool))


def _check_types(name: str, setting: dict, defaults: dict, source: str) -> None:
    """A finite number where the default is a number (``"three"`` for an interval once passed, and the
    row was only skipped when the bench ran it), and a whole one where the setting counts something
    (2.5 steps had run as 2 under the label steps=2.5)."""
    for knob, value in setting.items():
        default = defaults.get(knob)
        if value is None:  # null: allowed where the default is null too (cache_keys), not for a number
            if isinstance(default, int | float) and not isinstance(default, bool):
                raise SweepError(f"{source}: {name}'s {knob} is a number (default {default!r}), got null")
            continue
        whole = _is_whole_knob(knob, default)
        if not (whole or isinstance(default, float)):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise SweepError(f"{source}: {name}'s {knob} is a number (default {default!r}), got {value!r}")
        if whole and not float(value).is_integer():
            raise SweepError(f"{source}: {name}'s {knob} is a whole number (default {default!r}), got {value!r}")


def _whole_as_int(setting: dict, defaults: dict) -> dict:
    """A copy of ``setting`` with whole-number settings written 2.0 passed on as 2."""
    return {knob: int(value) if _is_whole_knob(knob, defaults.get(knob)) and isinstance(value, float) else value
            for knob, value in setting.items()}


def _check_peer_setting(name: str, setting: dict, source: str) -> None:
    """The peer's own range checks (an interval of 0 had reached diffusers as a ZeroDivisionError)."""
    try:
        PEERS[name].settings(setting)
    except ValueError as exc:
        raise SweepError(f"{source}: {name}'s {exc}") from None


def _check_plan_file(setting: dict, source: str, model: str) -> None:
    """A plan entry names a readable plan file for the model's adapter (before any worker starts; the
    executor checks its units against the model when its row runs)."""
    if not isinstance(setting.get("file"), str):
        raise SweepError(f'{source}: a plan entry needs "file": the path of a plan JSON file')
    try:
        plan = Plan.load(setting["file"])
    except PlanError as exc:
        raise SweepError(f"{source}: {exc}") from None
    if plan.adapter != model:  # had been skipped only after the baseline had run
        raise SweepError(f"{source}: the plan {setting['file']} is for a {plan.model_class} (the {plan.adapter} "
                         f"adapter), not this {model} model")


def _unique_names(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose names are unique: a name given twice would keep its last list alone, silently."""
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SweepError(f"the sweep names {', '.join(repeated)} twice; give each name once, with all its settings "
                         "in one list")
    return dict(pairs)


def read_sweep(path: Path) -> object:
    """A sweep file's JSON (validated against the model later, by ``validate``)."""
    try:
        return json.loads(Path(path).read_text(), object_pairs_hook=_unique_names)
    except FileNotFoundError:
        raise SweepError(f"sweep file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SweepError(f"sweep file {path} is not valid JSON: {exc}") from None


def load_sweep(path: Path, model: str) -> dict[str, list[dict]]:
    return validate(read_sweep(path), model, source=f"sweep file {path}")


def only(sweep: dict[str, list[dict]], names: list[str], model: str) -> dict[str, list[dict]]:
    """Keep the named entries; unknown names and names outside the sweep are errors."""
    for name in names:
        try:
            family_of(name)
        except SweepError:
            raise SweepError(f"--only: unknown method or peer {name!r}; the sweep has {', '.join(sweep)}") from None
        if name not in sweep:
            raise SweepError(f"--only: {name} is not in the sweep for the {model} model "
                             f"(it has {', '.join(sweep)})")
    kept = {name: settings for name, settings in sweep.items() if name in names}
    if not kept:
        raise SweepError("--only left an empty sweep")
    return kept


def setting_label(settings: dict) -> str:
    return ",".join(f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in settings.items()) \
        or "default"
