"""Search static plans on a calibration workload, under a quality budget, for the least cost.

    import diffaccel
    plan = diffaccel.find_plan(pipe, calls=[{"prompt": p, "num_inference_steps": 28} for p in prompts],
                               budget="psnr>=30", strategy="dp")

``calls`` are the pipeline calls to calibrate on (prompts or class labels, steps, guidance; noise
seeds from the calibration range); any supported diffusers pipeline works, and the embedded
pipelines have a default workload. ``search(pipe, workload, config)`` is the full interface (it
returns the front and a summary too; the CLI is ``diffaccel search``). Strategies, all producing
ordinary static Plans:

* ``nsga2``: NSGA-II (optuna) over a compact step x unit-set encoding (``space.py``), seeded with
  the hand-made plans; quality and cost are measured on the calibration set (``nsga.py``);
* ``dp``: for each unit set and each budget K of full steps, the full steps that minimise the
  profiled feature dissimilarity, by dynamic programming (DDT / CacheQuant; ``dp.py``);
* ``greedy``: the profile's cheapest-loss moves from all-compute (``greedy.py``), a baseline.

Every evaluation is an optuna trial, stored as it completes (``store.py``): a search killed at
any moment continues where it stopped when run again with the same command, and reaches the same
front as an uninterrupted one with the same seed (``nsga.py`` explains how). Several workers can
share one study through ``--storage`` (a database URL; see docs/search.md).
"""

from diffaccel.errors import BudgetError, CalibrationError, SearchError, SettingError, StorageMismatchError
from diffaccel.search.coefficients import fit_coefficients, record_reference
from diffaccel.search.config import Budget, SearchConfig, parse_budget, parse_duration
from diffaccel.search.heldout import compare
from diffaccel.search.result import SearchResult
from diffaccel.search.run import find_plan, search

__all__ = ["Budget", "BudgetError", "CalibrationError", "SearchConfig", "SearchError", "SearchResult", "SettingError",
           "StorageMismatchError", "compare", "find_plan", "fit_coefficients", "parse_budget", "parse_duration",
           "record_reference", "search"]
