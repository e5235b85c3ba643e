"""What a search returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffaccel.plan import Plan
from diffaccel.search.candidates import Candidate


@dataclass
class SearchResult:
    plan: Plan
    met: bool
    shortfall: float
    chosen: Candidate
    front: list[Candidate]
    handmade: list[Candidate]
    summary: dict
    out: Path | None
    points: list[Candidate] = field(default_factory=list)  # every scored candidate, hand-made ones too


