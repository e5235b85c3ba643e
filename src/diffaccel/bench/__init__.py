"""``diffaccel bench``: diffaccel's methods, the peers and fewer-step baselines on one model, side by side."""

from diffaccel.bench.config import BenchConfig
from diffaccel.bench.results import FORMAT_VERSION, BenchError, Results, load_results
from diffaccel.bench.runner import run_bench

__all__ = ["FORMAT_VERSION", "BenchConfig", "BenchError", "Results", "load_results", "run_bench"]
