"""What a search is asked for: the quality budget, the cost to minimise, the strategy and its
limits, as one typed ``SearchConfig``."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, fields, replace
from typing import Any

from diffaccel.errors import BudgetError, SettingError
from diffaccel.quant.spec import QuantSpec

STRATEGIES = ("nsga2", "dp", "greedy", "joint")
OBJECTIVES = ("macs", "latency", "bops")  # bops: MACs weighted by weight bits (joint searches)
PRECISIONS = ("auto", "none", "bfloat16", "float16")  # auto: what the device runs fast (``search/precision.py``)
_BUDGET = re.compile(r"^\s*(psnr_p5|psnr|ssim|judge)\s*>=\s*([-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)\s*$",
                     re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    metric: str  # "psnr" (dB) or "ssim": the mean over the calibration images
    threshold: float
    tail: float | None = None  # the 5th-percentile PSNR must reach this too (``psnr_p5>=X``)
    judge: float | None = None  # points: the judged share of images may change by no less (``judge>=-1``)

    @property
    def text(self) -> str:
        return (f"{self.metric}>={self.threshold:g}" + (f",psnr_p5>={self.tail:g}" if self.tail is not None else "")
                + (f",judge>={self.judge:g}" if self.judge is not None else ""))

    def met(self, quality: float) -> bool:
        return quality >= self.threshold

    def accepts(self, quality: float, psnr_p5: float | None) -> bool:
        """The mean meets the threshold, and the tail its bound (a plan that ruins a few images
        is not a fast plan)."""
        return self.met(quality) and (self.tail is None or (psnr_p5 is not None and psnr_p5 >= self.tail))

    def unit(self) -> str:
        return " dB" if self.metric == "psnr" else ""

    def gaps(self, quality: float, psnr_p5: float | None) -> tuple[float, float]:
        """How far a plan misses the mean's threshold and the tail's bound (0 where it meets them; the
        tail's in dB, infinite where no 5th percentile was recorded)."""
        tail = 0.0 if self.tail is None else (math.inf if psnr_p5 is None else max(0.0, self.tail - psnr_p5))
        return max(0.0, self.threshold - quality), tail

    def shortfall(self, quality: float, psnr_p5: float | None) -> float:
        """The miss, in the budget's unit: the larger gap of a PSNR budget (a plan that meets the mean
        but not the tail is short by the tail's gap); the mean's, else the tail's, under SSIM."""
        mean, tail = self.gaps(quality, psnr_p5)
        return max(mean, tail) if self.metric == "psnr" else (mean or tail)

    def miss_text(self, quality: float, psnr_p5: float | None) -> str:
        """Which parts a plan misses, and by how much (for messages)."""
        mean, tail = self.gaps(quality, psnr_p5)
        parts = ([f"{mean:.4g}{self.unit()} on the mean"] if mean > 0 else []) + (
            [f"{tail:.4g} dB on the 5th percentile"] if tail > 0 else [])
        return " and ".join(parts) or "nothing"

    def raised(self, margin: float) -> Budget:
        """The budget the calibration set must meet so that unseen inputs still meet this one. The
        tail bound is in dB: under an SSIM budget it is raised by the default PSNR margin (if any)."""
        tail_margin = margin if self.metric == "psnr" else (DEFAULT_MARGIN["psnr"] if margin > 0 else 0.0)
        return Budget(self.metric, self.threshold + margin, None if self.tail is None else self.tail + tail_margin,
                      self.judge)


# A plan chosen on a dozen calibration images loses some quality on other inputs (0.6-2 dB on the
# embedded models' joint searches): the calibration set must clear the budget by a margin, at least
# this much; for a PSNR budget, by default, the one-sided 95% bound on the error of the calibration
# mean (``auto_margin``), capped at MAX_AUTO_MARGIN.
DEFAULT_MARGIN = {"psnr": 0.5, "ssim": 0.005}
MAX_AUTO_MARGIN = 3.0
Z_ONE_SIDED_95 = 1.645


def auto_margin(points: list[tuple[float, float | None]], threshold: float, images: int) -> float:
    """The PSNR margin for a calibration set of ``images`` images: ``z * spread / sqrt(images)``, within
    the default and the cap. ``points``: (mean PSNR, per-image PSNR standard deviation) of plans scored
    on it; the spread is the median over those within 6 dB of ``threshold`` (over all if none is)."""
    near = [std for psnr, std in points if abs(psnr - threshold) <= 6] or [std for _, std in points]
    spreads = sorted(v for v in near if v is not None and math.isfinite(v))
    if not spreads or images < 2:
        return DEFAULT_MARGIN["psnr"]
    return max(DEFAULT_MARGIN["psnr"], mean_error_bound(spreads[len(spreads) // 2], images))


def mean_error_bound(spread: float, images: int) -> float:
    """The one-sided 95% error bound of a mean over ``images`` images whose per-image values spread
    by ``spread`` (standard deviation), capped at ``MAX_AUTO_MARGIN``."""
    return min(MAX_AUTO_MARGIN, Z_ONE_SIDED_95 * spread / math.sqrt(images))


TAIL_CONFIDENCE = 0.95  # what a tail bound checked on validation images holds with (``tail_lower_bound``)
TAIL_IMAGES = 93  # validation images a tail bound is checked on, where it can: the 2nd worst holds at 95% from 93.
# At 90% on 48 images (the worst one) two SD 6-step plans were confirmed at p5 >= 25.7 and 26.6 and had p5 23.4 and 24.6
# on 600 other images (7.5% and 5.7% of them under 25 dB; the chance of 48 images all above their worst: 1.4%, 1.0%)


def tail_lower_bound(values: list[float], quantile: float = 0.05,
                     confidence: float = TAIL_CONFIDENCE) -> tuple[float, float]:
    """A lower confidence bound on the ``quantile`` (the 5th percentile) of what ``values`` were drawn
    from, free of any assumption on their distribution: the k-th smallest value, for the largest k
    that lies at or under the quantile with probability >= ``confidence`` (how many of n values fall
    under it is Binomial(n, quantile)); the smallest value when there are too few for that confidence
    (under 59 at 95%). Returns the bound and the confidence it holds with. Why not the sample's own
    5th percentile: on 48 images that is their 2nd-3rd worst, and a plan chosen for clearing it missed
    it by 3 dB on 600 others (the SD search's 6-step plan)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("a tail bound needs at least one value")
    k, held = 1, _at_least(1, len(ordered), quantile)
    for j in range(2, len(ordered) + 1):
        chance = _at_least(j, len(ordered), quantile)
        if chance < confidence:
            break
        k, held = j, chance
    return ordered[k - 1], held


def _at_least(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) >= k)."""
    return 1.0 - sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k))


CORRECTION_SEED_OFFSET = 1000  # the feature correction is fitted on calibration seeds the search never scores


def parse_budget(text: str) -> Budget:
    """``psnr>=X`` (dB, mean over the calibration images) or ``ssim>=X`` (0 < X <= 1), optionally
    with a bound on the tail, ``psnr>=30,psnr_p5>=24``, and on a judge's verdicts, ``judge>=-1``: the
    share of images a judge (``search/judged.py``) reads as right may fall by at most 1 point."""
    if text is not None and not isinstance(text, str):
        raise BudgetError(f"a budget is text such as 'psnr>=30' or 'psnr>=30,psnr_p5>=24', got {text!r}")
    parts = [p for p in (text or "").split(",") if p.strip()]
    found: dict[str, float] = {}
    for part in parts:
        match = _BUDGET.match(part)
        if match is None:
            raise BudgetError(f"cannot read the budget {text!r}: write psnr>=X (dB, e.g. psnr>=30) or ssim>=X "
                              "(e.g. ssim>=0.95), optionally with psnr_p5>=Y for the 5th-percentile image and "
                              "judge>=-Z for the judged share of images (points)")
        name, value = match.group(1).lower(), float(match.group(2))
        if name in found:
            raise BudgetError(f"the budget {text!r} bounds {name} twice: give each of psnr, ssim, psnr_p5 and judge "
                              "once")
        if not math.isfinite(value):
            raise BudgetError(f"the budget {text!r} asks {name} to reach {value:g}: give a finite number")
        found[name] = value
    main = [m for m in ("psnr", "ssim") if m in found]
    if len(main) != 1:
        raise BudgetError(f"the budget {text!r} needs exactly one of psnr>=X or ssim>=X")
    metric, value = main[0], found[main[0]]
    if metric == "ssim" and not 0 < value <= 1:
        raise BudgetError(f"an SSIM budget must lie in (0, 1], got {value:g}")
    if metric == "psnr" and value <= 0:
        raise BudgetError(f"a PSNR budget must be positive (dB), got {value:g}")
    if not -100 <= found.get("judge", 0) <= 100:
        raise BudgetError(f"the budget {text!r} bounds the judged share's change at {found['judge']:g} points: "
                          "give a number of points between -100 and 100 (e.g. judge>=-1)")
    return Budget(metric, value, found.get("psnr_p5"), found.get("judge"))


def parse_duration(text: str | None) -> float | None:
    """``90s``, ``15m``, ``2h`` or plain seconds; None, empty or zero (in any unit) for no limit."""
    if text is None or str(text).strip() in ("", "0", "none"):
        return None
    match = re.fullmatch(r"\s*(\d+(\.\d*)?)\s*([smh]?)\s*", str(text))
    if match is None:
        raise SettingError(f"cannot read the time limit {text!r}: write e.g. 90s, 15m or 2h")
    seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(3)]
    return seconds or None


@dataclass(frozen=True)
class SearchConfig:
    """Every setting of a search; ``check()`` validates it before any work."""

    budget: str = "psnr>=30"
    objective: str = "macs"  # macs, latency (estimated from unit wall time) or bops (with quant)
    strategy: str = "nsga2"  # nsga2, dp or greedy
    seed: int = 0
    time_limit: float | None = None  # seconds; None for no limit
    trials: int | None = None  # nsga2: stop when the study holds this many trials
    population: int = 16
    pairs: int = 3  # interleaved baseline / plan runs of the held-out check
    granularity: str = "block"
    greedy_points: int = 20
    k_values: tuple[int, ...] | None = None  # dp: budgets of full steps (default: dp.default_k_values)
    margin: float | None = None  # calibration quality must clear the budget by this much (None: automatic)
    quant: QuantSpec | None = None  # joint search: quantize every candidate
    bits: tuple[int, ...] | None = None  # joint search: per-unit weight bits to choose from
    correct: bool = False  # fit a feature correction to the chosen plan
    validate: bool = True  # confirm the chosen plan on fresh calibration seeds (``validation.py``)
    judge_images: int = 600  # a judge budget: about this many images, the calibration calls on other seeds
    precision: str = "auto"  # try the chosen plan in a lower float precision (``precision.py``); none: never
    model_name: str | None = None  # names the study (default: the adapter)
    calibration_id: str | None = None  # identifies the calibration set in the storage

    def __post_init__(self) -> None:
        limit = self.time_limit  # as the command line writes it ("15m"), and zero for no limit, here too
        if isinstance(limit, str) or (limit == 0 and not isinstance(limit, bool)):
            object.__setattr__(self, "time_limit", parse_duration(str(limit)))

    def parsed_budget(self) -> Budget:
        return parse_budget(self.budget)

    def searched_quant(self) -> QuantSpec | None:
        """The quantization every candidate is searched with; None where it is only the last step's
        (a joint search by MACs, whose MACs quantization leaves as they are: ``search/precision.py``)."""
        return None if self.strategy == "joint" and self.objective == "macs" else self.quant

    def effective_margin(self) -> float:
        budget = self.parsed_budget()
        return DEFAULT_MARGIN[budget.metric] if self.margin is None else float(self.margin)

    def largest_margin(self) -> float:
        """The most the search may raise the budget by: the margin given, else the automatic one's cap."""
        if self.margin is not None:
            return float(self.margin)
        return MAX_AUTO_MARGIN if self.parsed_budget().metric == "psnr" else DEFAULT_MARGIN["ssim"]

    def check(self) -> None:
        """Raise a one-line SettingError (a SearchError and a ValueError) for a setting that cannot work."""
        self.parsed_budget()
        if self.objective not in OBJECTIVES:
            raise SettingError(f"unknown objective {self.objective!r}; choose {' or '.join(OBJECTIVES)}")
        if self.strategy not in STRATEGIES:
            raise SettingError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.precision not in PRECISIONS:
            raise SettingError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.time_limit is not None and not (isinstance(self.time_limit, (int, float)) and self.time_limit > 0):
            raise SettingError(f"time_limit is in seconds (> 0; 0 or None for no limit), got {self.time_limit!r}")
        if self.trials is not None and self.trials < 1:
            raise SettingError(f"trials must be >= 1, got {self.trials}")
        margin = self.effective_margin()
        if not math.isfinite(margin) or margin < 0:
            raise SettingError(f"the margin must be a finite number >= 0, got {margin}")
        if self.strategy == "joint" and self.quant is not None and self.objective == "macs" \
                and self.quant.backend == "fake":
            raise SettingError("simulated quantization (backend fake) changes neither the MACs nor the time, so "
                              "a joint search by MACs could never choose it: give --objective bops (MACs weighted "
                              "by weight bits) or latency, or a real backend (--quant-backend int8-dynamic or "
                              "int8), which a search by MACs tries on the plan it chose")
        if self.parsed_budget().judge is not None and not self.validate:
            raise SettingError("a judge budget (judge>=X) is checked with the validation: leave validate on")
        if isinstance(self.judge_images, bool) or not isinstance(self.judge_images, int) or self.judge_images < 1:
            raise SettingError(f"judge_images must be a whole number >= 1, got {self.judge_images!r}")
        if self.objective == "bops" and self.quant is None:
            raise SettingError("the bops objective weighs MACs by weight bits: give a quantization spec (--quant)")
        if isinstance(self.population, bool) or not isinstance(self.population, int) or self.population < 2:
            raise SettingError(f"population (nsga2's generation size) must be a whole number >= 2, got "
                               f"{self.population!r}")
        self.check_k_values()

    def check_k_values(self, num_steps: int | None = None) -> None:
        """The dp strategy's budgets of full steps: whole numbers from 1 to the steps (when known)."""
        top = num_steps or math.inf
        if self.k_values is not None and (not self.k_values or any(
                isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= top for k in self.k_values)):
            raise SettingError(f"k_values (dp's numbers of full steps) must be whole numbers from 1 to "
                               f"{num_steps or 'the steps'}, got {self.k_values!r}")


def configured(config: SearchConfig | None, options: dict[str, Any]) -> SearchConfig:
    """``config`` (the default settings if None) with ``options``, ``SearchConfig``'s fields by name;
    ``time_limit`` may also be written as the command line takes it ("90s", "15m", "2h"); zero, in any
    form, means no limit, as None does."""
    names = [f.name for f in fields(SearchConfig)]
    unknown = [key for key in options if key not in names]
    if unknown:
        hints = [f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                 for key in unknown for close in [difflib.get_close_matches(key, names, 1, cutoff=0.5)]]
        raise SettingError(f"unknown search setting {', '.join(hints)}; the settings are {', '.join(names)}")
    return replace(config or SearchConfig(), **options)
