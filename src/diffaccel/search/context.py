"""One running search's state: its settings, calibration run, space, storage and clock, and the
time it keeps back, after its strategy, for the validation, the precision step and the held-out check."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffaccel.calibration.reference import CalibrationRun
from diffaccel.search.candidates import Candidate
from diffaccel.search.config import Budget, SearchConfig
from diffaccel.search.judged import Judge
from diffaccel.search.precision import Arithmetic, arithmetic_choices, precision_seconds
from diffaccel.search.space import Space
from diffaccel.search.store import Store
from diffaccel.search.validation import Validator


@dataclass
class Context:
    """One running search: its settings, calibration run, space, storage and clock."""

    config: SearchConfig
    budget: Budget
    calib: CalibrationRun
    space: Space
    store: Store
    out: Path | None
    started: float
    log: Callable[[str], None]
    reserve: float = 0.0  # seconds kept back for the held-out check after the strategy
    joint: list[Candidate] = field(default_factory=list)  # the joint strategy's candidates (not in the store)
    quant_speed: float | None = None  # joint + quant: measured quantized / plain wall time of the model
    margin: float = 0.0  # what calibration quality must clear the budget by (``_margin``)
    validator: Validator | None = None  # scores plans on fresh seeds (``config.validate``)
    precision_speed: float | None = None  # the returned plan's measured speed-up from its precision or int8
    precision_tried: list[dict] = field(default_factory=list)  # each arithmetic the last step measured
    judge: Judge | None = None  # scores each image's verdict (``judged.py``): the judge budget, the held-out check

    def keep_back(self, seconds: float) -> None:
        """Keep ``seconds`` of the time limit for the steps after the strategy (validation, a judge's
        checks, precision, held-out check), at most half of it (logged): the search proper keeps the
        rest. Estimated from the calibration run: on a loaded machine that run is slow, and a judge's
        600 images came to more than the whole limit (the search then scored nothing)."""
        limit = self.config.time_limit
        if limit and seconds > limit / 2:
            self.log(f"warning: the steps after the search are estimated at {seconds:.0f} s, more than half the "
                     f"{limit:.0f} s limit: the search keeps half of it and the whole run may overrun the limit; "
                     "give more time, or fewer judge or held-out images")
            seconds = limit / 2
        self.reserve = seconds

    def validation_reserve(self) -> float:
        """Seconds kept back for the validation, and for a judge budget's checks (``judged.py``)."""
        return self.validator.reserve() if self.validator is not None and self.config.time_limit else 0.0

    def arithmetic(self) -> list[Arithmetic]:
        """What the last step may run the chosen plan in (``precision.py``)."""
        return arithmetic_choices(self.config.precision, self.config.quant, self.calib.model)

    def precision_reserve(self) -> float:
        return precision_seconds(self.calib) if self.arithmetic() and self.config.time_limit else 0.0

    @property
    def deadline(self) -> float | None:
        if not self.config.time_limit:
            return None
        return self.started + max(0.0, self.config.time_limit - self.reserve)
