"""Reading plan files (diffusion ``Plan`` and ``LMPlan`` alike): JSON objects of one format version,
validated by their pydantic model, every problem one error that names the file and what to fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


# the field only one kind of plan file holds, and how to read that kind
OWN_FIELD = {"plan": ("adapter", "an image plan", "diffaccel.Plan.load (command line: an image model's --plan)"),
             "LM plan": ("kind", "an LM plan", "diffaccel.LMPlan.load (command line: --model dlm --plan)")}


def read_plan_json(path: Path, what: str, version: int, error: type[Exception]) -> dict:
    """The JSON object in ``path`` (a ``what`` file: "plan" or "LM plan"), checked for format ``version``."""
    try:
        data = json.loads(path.read_text())
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
    if data.get("version", version) != version:  # repr: a "1" (text) is not version 1
        raise error(f"{what} file {path} has version {data.get('version')!r}; this diffaccel reads version {version}")
    return data


def validated(cls: type[Model], data: dict, what: str, error: type[Exception]) -> Model:
    """``data`` as a ``cls``, or ``error`` listing every field that is wrong."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(("{}: ".format(".".join(map(str, e["loc"]))) if e["loc"] else "")
                             + e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise error(f"invalid {what}: {problems}") from None


def write_plan_json(path: Path, text: str) -> Path:
    """``text`` written to ``path`` whole or not at all (a temporary file renamed over it); missing
    folders are made."""
    if path.is_dir():
        raise IsADirectoryError(21, "Is a directory (give a file name for the plan, e.g. plan.json inside it)",
                                str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
