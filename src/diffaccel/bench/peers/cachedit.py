"""cache-dit's DBCache (and its TaylorSeer calibrator) on a transformer pipeline."""

from __future__ import annotations

from diffaccel.bench.peers.base import Candidate, Context, PeerSpec


def _cachedit(ctx: Context, settings: dict, calibrator: bool) -> Candidate:
    """Stock diffusers pipelines through ``cache_dit.enable_cache(pipe)``, as its docs show; our
    embedded DiT pipeline (not in cache-dit's registry) through a ``BlockAdapter`` like the one
    cache-dit registers for diffusers' DiT pipeline."""
    import cache_dit  # optional: the peers extra
    from cache_dit import BlockAdapter, ForwardPattern
    from cache_dit.caching.patch_functors import DiTPatchFunctor

    s = SPECS["cachedit-dbcache-taylorseer" if calibrator else "cachedit-dbcache"].settings(settings)
    pipe = ctx.fresh_pipe()
    target = pipe
    if ctx.embedded:
        target = BlockAdapter(pipe=pipe, transformer=pipe.transformer, blocks=pipe.transformer.transformer_blocks,
                              forward_pattern=ForwardPattern.Pattern_3, patch_functor=DiTPatchFunctor(),
                              check_forward_pattern=True)
    config = cache_dit.DBCacheConfig(Fn_compute_blocks=s["first_blocks"], Bn_compute_blocks=s["last_blocks"],
                                     max_warmup_steps=s["warmup"], residual_diff_threshold=s["threshold"],
                                     max_continuous_cached_steps=s["max_continuous"])
    calib = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=s["order"]) if calibrator else None
    cache_dit.enable_cache(target, cache_config=config, calibrator_config=calib)
    return Candidate(lambda call: ctx.sample(pipe, call), close=lambda: cache_dit.disable_cache(pipe))


def cachedit_dbcache(ctx: Context, settings: dict) -> Candidate:
    return _cachedit(ctx, settings, calibrator=False)


def cachedit_dbcache_taylorseer(ctx: Context, settings: dict) -> Candidate:
    return _cachedit(ctx, settings, calibrator=True)


KNOBS = {"threshold": 0.08, "first_blocks": 1, "last_blocks": 0, "warmup": 4, "max_continuous": -1}
SPECS: dict[str, PeerSpec] = {spec.name: spec for spec in [
    PeerSpec("cachedit-dbcache", "cache-dit DBCache", ("dit", "pixart"), "cache_dit", "cache-dit==1.5.3", KNOBS,
             cachedit_dbcache),
    PeerSpec("cachedit-dbcache-taylorseer", "cache-dit DBCache + TaylorSeer calibrator", ("dit", "pixart"),
             "cache_dit", "cache-dit==1.5.3", {**KNOBS, "order": 1}, cachedit_dbcache_taylorseer),
]}
