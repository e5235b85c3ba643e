"""How many calibration and held-out images a search of a given time limit affords.

The search makes roughly as many runs whatever their size, so the calibration set can grow with the
time limit: more images make the fitted samplers and their validation more reliable (on the embedded
models 48 rather than 24 images let the fitted 5- and 7-step samplers through validation, in the same
15 minutes), and every run slower. The held-out check (``heldout.py``) runs after the search; a set
too large for the limit makes the whole command overrun it (the SD pipeline's default 48 held-out
images: an estimated 597 s of a 15-minute limit). Both are sized from one timed run of one image per
class or prompt at ``PROBE_STEPS`` steps, scaled to the search's step count. The sizes are kept in
the output folder (``SIZES_FILE``): a rerun that resumes the search there takes them again, where a
fresh timing on a busier machine would size another calibration set, which the stored search refuses.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from diffaccel.search.heldout import heldout_seconds

PROBE_STEPS = 2  # steps of the timed run of one image per class or prompt
CALIBRATION_SHARE = 0.03  # of the time limit: the most the reference run of the calibration set may take
CALIBRATION_PER_CLASS = (2, 8)  # the fewest and most calibration images per class or prompt
HELDOUT_SHARE = 0.25  # of the time limit: the most the held-out check may take
HELDOUT_PER_CLASS = (1, 4)  # the fewest and most held-out images per class or prompt
SIZES_FILE = "sizes.json"  # in the output folder: the sizes a search there was given


def _within(share: float, time_limit: float, seconds_per_image: float, bounds: tuple[int, int]) -> int:
    low, high = bounds
    return max(low, min(high, math.floor(share * time_limit / max(seconds_per_image, 1e-9))))


def affordable_sizes(run_one_each: Callable[[], Any], steps: int, time_limit: float | None, pairs: int,
                     calibration: int | None = None, heldout: int | None = None,
                     log: Callable[[str], None] = print) -> tuple[int, int]:
    """(calibration, held-out) images per class or prompt for a search of ``time_limit`` seconds whose
    held-out check times ``pairs`` runs: those given, else as many as keep the reference run of the
    calibration set within ``CALIBRATION_SHARE`` of the limit and the held-out check within
    ``HELDOUT_SHARE`` (each within its bounds). ``run_one_each`` runs the pipeline on one image per
    class or prompt at ``PROBE_STEPS`` steps; it is timed once, and only when a size is left open. With
    no limit, the largest sizes; when the timed run fails, the smallest (the search reports the error)."""
    if calibration is not None and heldout is not None:
        return calibration, heldout
    if time_limit is None:
        return calibration or CALIBRATION_PER_CLASS[1], heldout or HELDOUT_PER_CLASS[1]
    started = time.perf_counter()
    try:
        run_one_each()
    except Exception as exc:  # noqa: BLE001 -- the search itself reports what is wrong with the pipeline
        log(f"images per class or prompt: the fewest (the timed run failed: {type(exc).__name__})")
        return calibration or CALIBRATION_PER_CLASS[0], heldout or HELDOUT_PER_CLASS[0]
    reference = (time.perf_counter() - started) * steps / PROBE_STEPS  # one image per class or prompt
    calibration = calibration or _within(CALIBRATION_SHARE, time_limit, reference, CALIBRATION_PER_CLASS)
    heldout = heldout or _within(HELDOUT_SHARE, time_limit, heldout_seconds(reference, pairs), HELDOUT_PER_CLASS)
    log(f"images per class or prompt: {calibration} for calibration, {heldout} held-out (a {steps}-step run of one "
        f"each takes about {reference:.1f} s here; the calibration set's within {CALIBRATION_SHARE:.0%} of the "
        f"{time_limit:g} s limit, the held-out check within {HELDOUT_SHARE:.0%})")
    return calibration, heldout


def kept_sizes(out: Path | None, sizes: tuple[int | None, int | None],
               log: Callable[[str], None] = print) -> tuple[int | None, int | None]:
    """``sizes``, with those left open taken from the search kept in ``out`` (``SIZES_FILE``), if any."""
    path = None if out is None else Path(out) / SIZES_FILE
    if all(size is not None for size in sizes) or path is None or not path.is_file():
        return sizes
    try:
        kept = json.loads(path.read_text())
        found = (int(kept["calibration"]), int(kept["heldout"]))
    except (OSError, ValueError, KeyError, TypeError):
        return sizes
    merged = tuple(given if given is not None else stored for given, stored in zip(sizes, found))
    log(f"images per class or prompt: {merged[0]} for calibration, {merged[1]} held-out ("
        + ("both" if sizes == (None, None) else "calibration" if sizes[0] is None else "held-out")
        + f" as the search in {out} was sized; give --calib-per-class and --heldout-per-class to change them, "
        "in another --out)")
    return merged


@contextlib.contextmanager
def sizes_kept(out: Path | None, calibration: int, heldout: int) -> Iterator[None]:
    """Record the sizes of the first search that writes to ``out`` (``SIZES_FILE``) for the search run
    inside; one that fails with an error takes its record away again (a killed one, which a rerun
    resumes, keeps it). A later search there resumes on them, or is refused by the stored study."""
    path = None if out is None else Path(out) / SIZES_FILE
    if path is None or (path.parent.exists() and not path.parent.is_dir()) or path.exists():
        yield  # no folder, or a file where it belongs (the search refuses it), or recorded already
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"calibration": calibration, "heldout": heldout}) + "\n")
    try:
        yield
    except Exception:
        path.unlink(missing_ok=True)
        raise
