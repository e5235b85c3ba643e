"""Key steps by dynamic programming (DDT / CacheQuant): compute the whole model at ``keys`` steps
chosen from a profile, and reuse every unit's output at the others.

One full-compute pass over a few calibration images (seeds disjoint from evaluation seeds) records
how far each unit's output moves between any two steps (``search.evaluate.CalibrationRun``); the
DP of ``search.dp`` then places the key steps where reuse costs least. This is the schedule the
plan search finds on both embedded models, packaged as one method with one knob.
"""

from __future__ import annotations

from diffaccel.plan import Plan


def keysteps(pipe, num_steps: int = 50, keys: int = 12, level: str = "all", correct: bool = False,
             guidance: float = 3.0, per_class: int = 2, seed: int = 0) -> Plan:
    """A plan that computes ``keys`` of the ``num_steps`` steps and reuses ``level``'s units at the
    rest (``all``: every unit; the search space's other levels, e.g. ``deep0`` or ``mid``, also work).
    ``correct``: add a per-channel linear correction of the reused features, fitted offline
    (``methods.feature_correction``)."""
    from diffaccel.search.dp import optimal_keys
    from diffaccel.search.evaluate import CalibrationRun, embedded_calibration
    from diffaccel.search.profile import level_matrix
    from diffaccel.search.space import Space

    if not 1 <= keys <= num_steps:
        raise ValueError(f"keys must lie in [1, {num_steps}], got {keys}")
    space = Space(pipe.denoiser, num_steps)
    if level not in space.by_name or level == "C":
        names = [name for name in space.by_name if name != "C"]
        raise ValueError(f"unknown level {level!r} for this model; choose one of {', '.join(names)}")
    calibrate = embedded_calibration(None, per_class, num_steps, guidance, seed=seed)
    run = CalibrationRun(pipe, calibrate, num_steps, space.units)
    chosen, loss = optimal_keys(level_matrix(run.dissimilarity, space, level), keys)
    genome = tuple("C" if step in chosen else level for step in range(1, num_steps))
    params = {"keys": keys, "level": level, "correct": correct, "key_steps": chosen, "estimated_loss": round(loss, 5),
              "calibration_images": len(run.reference)}
    plan = space.plan(genome, "keysteps", params)
    if correct:
        from diffaccel.methods.feature_correction import fit_feature_correction

        plan = fit_feature_correction(pipe, plan, guidance, seed=seed)
    return plan
