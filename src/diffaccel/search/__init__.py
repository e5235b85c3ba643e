"""Search static plans on a calibration set, under a quality budget, for the least cost.

    from diffaccel.search import search, embedded_calibration
    result = search(pipe, calibrate, num_steps=50, budget="psnr>=30", strategy="nsga2", out="out/search")
    result.plan.save("plan.json")

``calibrate(pipe)`` runs the pipeline on the calibration inputs and returns images in [0, 1];
any supported diffusers pipeline works (``embedded_calibration`` builds one for the embedded
models; the CLI is ``diffaccel search``). Strategies, all producing ordinary static Plans:

* ``nsga2``: NSGA-II (optuna) over a compact step x unit-set encoding (``space.py``), seeded with
  the hand-made plans; quality and cost are measured on the calibration set (``nsga.py``);
* ``dp``: for each unit set and each budget K of full steps, the full steps that minimise the
  profiled feature dissimilarity, by dynamic programming (DDT / CacheQuant; ``dp.py``);
* ``greedy``: the profile's cheapest-loss moves from all-compute (``greedy.py``), a baseline.

Every evaluation is an optuna trial, stored as it completes (``store.py``): a search killed at
any moment continues where it stopped when run again with the same command, and reaches the same
front as an uninterrupted one with the same seed (``nsga.py`` explains how).

Many workers, many machines: give every worker the same command with ``--storage`` pointing at a
shared database server, e.g. ``diffaccel search --model dit --budget "psnr>=30" --out out/w1
--storage postgresql://user:password@dbhost/diffaccel`` (``pip install psycopg2-binary``; MySQL
works too). Each worker asks the storage for the next trial, evaluates it on its own copy of the
model and calibration set, and writes the result; the NSGA-II sampler builds each generation
from all workers' completed trials. Trials of a worker that dies are failed and re-enqueued by the
others once their heartbeat is older than the grace period (``store.GRACE_S``). Several
processes on one machine can share the default SQLite file the same way (same ``--out``). Any
worker's outputs reflect the whole shared study when it finishes.
"""

from diffaccel.search.errors import BudgetError, CalibrationError, SearchError, StorageMismatchError
from diffaccel.search.evaluate import compare, embedded_calibration
from diffaccel.search.run import Budget, SearchResult, parse_budget, parse_duration, search

__all__ = ["Budget", "BudgetError", "CalibrationError", "SearchError", "SearchResult", "StorageMismatchError",
           "compare", "embedded_calibration", "parse_budget", "parse_duration", "search"]
