"""``LMPlan``: what a diffusion-LM decoding run caches, as validated JSON data.

The image ``Plan`` describes step x unit actions; a diffusion LM's caching is decided per token
instead (which positions a step recomputes), so it has its own small schema. Methods:

* ``none``          the LLaDA sampler, every position recomputed every step (all-compute);
* ``dkv-decode``    dKV-Cache-Decode: prompt cached from the start, a decoded token's keys and
  values cached one step after it is decoded, the whole cache refreshed every ``refresh_every``
  steps (0: never);
* ``dkv-greedy``    dKV-Cache-Greedy: like decode, but of the masked tokens only a ``window`` of
  the left-most ones is recomputed (and eligible for decoding);
* ``prompt-cache``  only the prompt's keys and values are cached (refreshed likewise);
* ``block``         SDAR block diffusion with blocks of ``block_size`` tokens, finished blocks
  cached exactly (``block_cache``; False recomputes the prefix each step, for reference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffaccel.plan import PlanError
from diffaccel.plan_files import read_plan_json, validated, write_plan_json

LM_PLAN_VERSION = 1
LM_METHODS = ("none", "dkv-decode", "dkv-greedy", "prompt-cache", "block")
_REFRESHING = ("dkv-decode", "dkv-greedy", "prompt-cache")
LM_SETTINGS = ("refresh_every", "window", "block_size", "block_cache")  # what ``--param key=value`` may set


class LMPlanError(PlanError):
    """An LM plan is malformed or does not fit the model or the call it is applied to."""


class LMPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = LM_PLAN_VERSION
    kind: str = Field("dlm", description="the model kind the plan is for (a pipeline's ``kind``)")
    method: Literal["none", "dkv-decode", "dkv-greedy", "prompt-cache", "block"]
    refresh_every: int = Field(0, ge=0, strict=True, description="recompute every position every N steps (0: never)")
    window: int | None = Field(None, ge=1, strict=True, description="dkv-greedy: masked positions recomputed per step")
    block_size: int | None = Field(None, ge=1, strict=True, description="block: tokens per block")
    block_cache: bool = Field(True, strict=True,
                              description="block: cache finished blocks (False: recompute the prefix)")
    answer_length: int | None = Field(None, ge=1, strict=True, description="the answer length the plan was made for")
    params: dict = Field(default_factory=dict, description="free-form record (e.g. how a search chose it)")

    @model_validator(mode="after")
    def _check(self) -> LMPlan:
        if (self.method == "dkv-greedy") != (self.window is not None):
            raise ValueError("'window' is needed by dkv-greedy and only by it")
        if (self.method == "block") != (self.block_size is not None):
            raise ValueError("'block_size' is needed by the block method and only by it")
        if self.refresh_every and self.method not in _REFRESHING:
            raise ValueError(f"'refresh_every' applies to {', '.join(_REFRESHING)}, not {self.method}")
        if not self.block_cache and self.method != "block":
            raise ValueError("'block_cache' applies to the block method only")
        if self.block_size and self.answer_length and self.answer_length % self.block_size:
            raise ValueError(f"block_size {self.block_size} does not divide the answer length {self.answer_length}")
        return self

    def setting(self) -> str:
        """The method's settings in one short string (for tables and records)."""
        parts = {"dkv-decode": [f"refresh_every={self.refresh_every}"],
                 "prompt-cache": [f"refresh_every={self.refresh_every}"],
                 "dkv-greedy": [f"window={self.window}", f"refresh_every={self.refresh_every}"],
                 "block": [f"block_size={self.block_size}", f"cache={'on' if self.block_cache else 'off'}"]}
        return ", ".join(parts.get(self.method, ["all positions every step"]))

    # -- files -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)

    def save(self, path: str | Path) -> Path:
        return write_plan_json(Path(path), self.to_json())

    @classmethod
    def from_dict(cls, data: dict) -> LMPlan:
        return validated(cls, data, "LM plan", LMPlanError)

    @classmethod
    def load(cls, path: str | Path) -> LMPlan:
        data = read_plan_json(Path(path), "LM plan", LM_PLAN_VERSION, LMPlanError)
        return cls.from_dict(data)


def make_lm_plan(method: str, **settings) -> LMPlan:
    """An LM plan from a method name and its settings (``make_lm_plan("dkv-decode", refresh_every=4)``);
    errors name the method's settings."""
    if method not in LM_METHODS:
        raise LMPlanError(f"unknown LM method {method!r}; methods are {', '.join(LM_METHODS)}")
    return LMPlan.from_dict({"method": method, **settings})
