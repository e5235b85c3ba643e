"""Parallel sampling on GPUs: the table of ``benchmarks/parallel.py``, with NCCL, one process per GPU.

    python benchmarks/gpu_parallel.py [--models dit unet] [--reps 5] [--per-class 32] [--nprocs N]

The same code path as on CPUs: ``diffaccel.parallel`` picks NCCL when each rank has a GPU
(``diffaccel.parallel.group.backend``), every rank pins ``cuda:<rank>``, the pipelines move to it,
and timings synchronize the device before the clock stops. The single-process settings run on GPU 0
while the other ranks wait at a barrier; the parallel ones on every GPU. Rows (same fields as the
CPU table, ``processes`` = the number of GPUs used) go to ``benchmarks/results/gpu_parallel.json``.
More images per class by default (32: 192 images, 384 rows per guided step) so that the GPUs have
work beyond kernel launches; the embedded models stay small, so expect launch-bound figures.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from diffaccel.parallel import spawn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parallel as bench  # noqa: E402  (benchmarks/parallel.py: the settings, the runs, the rows)


def main(argv: list[str] | None = None) -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    args = bench.parse(argv, device="cuda", nprocs=max(gpus, 2), per_class=32)  # --help before the GPU check
    if gpus < 2:
        raise SystemExit(f"benchmarks/gpu_parallel.py needs at least 2 GPUs (found {gpus}); on CPUs run "
                         "benchmarks/parallel.py")
    if not 2 <= args.nprocs <= gpus:
        raise SystemExit(f"--nprocs must lie in [2, {gpus}] (one process per GPU)")
    os.environ.setdefault("DIFFACCEL_DIST_BACKEND", "nccl")
    os.environ.setdefault("DIFFACCEL_DIST_TIMEOUT", "1800")
    spawn(bench.worker, args.nprocs, (args,))


if __name__ == "__main__":
    main()
