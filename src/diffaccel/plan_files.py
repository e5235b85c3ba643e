"""Reading plan files (diffusion ``Plan`` and ``LMPlan`` alike): JSON objects of one format version,
validated by their pydantic model, every problem one error that names the file and what to fix."""

from __future__ import annotations

import json
import os
import shutil
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


# the field only one kind of plan file holds, and how to read that kind
OWN_FIELD = {"plan": ("adapter", "an image plan", "diffaccel.Plan.load (command line: an image model's --plan)"),
             "LM plan": ("kind", "an LM plan", "diffaccel.LMPlan.load (command line: --model dlm --plan)")}


# the text of plan files that are streams (a pipe, /dev/stdin): a command reads a plan more than once
# (to tell an LM plan from an image plan, to check it before the model loads), and a stream only once
_STREAMS: dict[str, str] = {}


def plan_text(path: Path) -> str:
    """A plan file's text: UTF-8 whatever the system's encoding, a byte-order mark tolerated (editors
    on Windows write one), a stream read once per process."""
    path = Path(path)
    if str(path) in _STREAMS:
        return _STREAMS[str(path)]
    text = path.read_text(encoding="utf-8-sig")
    if path.exists() and not path.is_file():
        _STREAMS[str(path)] = text
    return text


def read_plan_json(path: Path, what: str, version: int, error: type[Exception]) -> dict:
    """The JSON object in ``path`` (a ``what`` file: "plan" or "LM plan"), checked for format ``version``."""
    try:
        data = json.loads(plan_text(path))
    except FileNotFoundError:
        raise error(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder: give the {what} file in it (e.g. {path / 'plan.json'})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} file {path} is not valid JSON (truncated or malformed?): {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{what} file {path} must hold a JSON object")
    own, named, _ = OWN_FIELD[what]
    for other, (field, other_named, reader) in OWN_FIELD.items():
        if other != what and field in data and own not in data:
            raise error(f"{path} is {other_named} file, not {named} file: read it with {reader}")
    if "version" not in data and own not in data:
        keys = ", ".join(list(data)[:4]) or "none"
        hint = ": give a file that Plan.save, plan make or --save-plan wrote" if what == "plan" else ""
        raise error(f"{path} is not {named} file (it has no version or {own} field; its fields: {keys}){hint}")
    found = data.get("version", version)
    if found != version or type(found) is not int:  # repr: a "1" (text) or true is not version 1
        raise error(f"{what} file {path} has version {data.get('version')!r}; this diffaccel reads version {version}")
    return data


def json_types(cls: type[BaseModel], data: Any) -> Any:
    """A before-validator for plan sections: a hand-edited ``"yes"``, ``true`` or ``"2"`` where a number
    or a flag belongs is refused, not converted as pydantic's lax mode would (true had become 1)."""
    if not isinstance(data, dict):
        return data
    for name, value in data.items():
        field = cls.model_fields.get(name)
        kinds = set(typing.get_args(field.annotation) or (field.annotation,)) if field is not None else set()
        numeric = bool(kinds & {int, float})
        if numeric and bool not in kinds and isinstance(value, (bool, str)):
            raise ValueError(f"{name} must be a {'number' if float in kinds else 'whole number'}, not "
                             f"{json.dumps(value)}")
        if bool in kinds and not (isinstance(value, bool) or value is None and type(None) in kinds):
            raise ValueError(f"{name} must be true or false, not {json.dumps(value)}")
    return data


def validated(cls: type[Model], data: dict, what: str, error: type[Exception]) -> Model:
    """``data`` as a ``cls``, or ``error`` listing every field that is wrong."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(("{}: ".format(".".join(map(str, e["loc"]))) if e["loc"] else "")
                             + e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise error(f"invalid {what}: {problems}") from None


def write_plan_json(path: Path, text: str, beside: tuple[Path, Path] | None = None) -> Path:
    """``text`` written to ``path`` whole or not at all (a temporary file renamed over it); missing
    folders are made. ``beside``: a file copied with it (``(source, target)``: a quantized plan's
    calibration), put in place only once the plan is written, so that a failed save leaves an earlier
    plan with its own calibration and no stray file."""
    if path.is_dir():
        raise IsADirectoryError(21, "Is a directory (give a file name for the plan, e.g. plan.json inside it)",
                                str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    if beside is not None and beside[0].resolve() != beside[1].resolve():
        staged = beside[1].with_name(f".{beside[1].name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(beside[0], staged)
            write_plan_json(path, text)
            staged.replace(beside[1])
        finally:
            staged.unlink(missing_ok=True)
        return path
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
