"""Past one device: parallel sampling through ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).

* **CFG parallelism** (``cfg.py``): the denoiser's batch (``[unconditional, conditional]``) split
  over ranks, the output gathered back once per call; exact.
* **Patch parallelism** (``patch.py``): bands of patch rows per rank with stale keys and values from
  the previous step for self-attention (DistriFusion); DiT-style transformers.
* **Batch parallelism** (``shard.py``): a job's images split over ranks, gathered on rank 0.

Each composes with any static plan: hooks run outside the executor's ``forward`` wrapper, so every
rank's executor sees its own consistent part. ``group.py`` joins the group a launcher describes
(``torchrun --nproc-per-node 2 -m diffaccel generate --parallel cfg ...``) or spawns one from Python;
``agree.py`` stops every rank when they hold different plans, weights, schedulers, calls or settings. See
docs/parallel.md.
"""

from diffaccel.parallel.agree import check_agreement
from diffaccel.parallel.cfg import CFGParallel, cfg_parallel
from diffaccel.parallel.errors import ParallelError
from diffaccel.parallel.group import Group, close, current, init, spawn, tag_logging
from diffaccel.parallel.job import ParallelConfig
from diffaccel.parallel.patch import PatchParallel, patch_parallel

__all__ = ["CFGParallel", "Group", "ParallelConfig", "ParallelError", "PatchParallel", "cfg_parallel",
           "check_agreement", "close", "current", "init", "patch_parallel", "spawn", "tag_logging"]
