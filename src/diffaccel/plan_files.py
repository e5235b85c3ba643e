"""Reading plan files (diffusion ``Plan`` and ``LMPlan`` alike): JSON objects of one format version,
validated by their pydantic model, every problem one error that names the file and what to fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


def read_plan_json(path: Path, what: str, version: int, error: type[Exception]) -> dict:
    """The JSON object in ``path`` (a ``what`` file, e.g. "plan"), checked for format ``version``."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{what} file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} file {path} is not valid JSON (truncated or malformed?): {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{what} file {path} must hold a JSON object")
    if data.get("version", version) != version:
        raise error(f"{what} file {path} has version {data.get('version')}; this diffaccel reads version {version}")
    return data


def validated(cls: type[Model], data: dict, what: str, error: type[Exception]) -> Model:
    """``data`` as a ``cls``, or ``error`` listing every field that is wrong."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'plan'}: {e['msg']}" for e in exc.errors())
        raise error(f"invalid {what}: {problems}") from None
