"""The peers ``diffaccel bench`` compares against, each applied to an embedded model as its users would.

Every peer is a small function ``open(ctx, settings) -> Candidate`` that runs inside a worker
subprocess (see ``diffaccel.bench.worker``): it takes a fresh copy of the pipeline, applies the
peer's own code to it and returns a ``Candidate`` whose ``run(labels, seeds)`` samples images with
the same seeds, sampler, steps and guidance as the baseline. The worker times, counts and scores it.

Where a peer expects a Stable Diffusion pipeline, the adaptation is the least that makes its own
code run on the embedded U-Net (see each function); nothing of the peer's algorithm is rewritten.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import importlib.util
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from diffaccel.zoo.pipeline import sample


@dataclass
class Candidate:
    """One setting of one method, ready to sample: ``run(labels, seeds) -> images in [0, 1]``."""

    run: Callable[[torch.Tensor, list[int]], torch.Tensor]
    close: Callable[[], None] = lambda: None
    notes: str = ""
    extra: Callable[[], dict] | None = None  # more row fields after the timed runs (e.g. executor stats)
    # MACs are counted on this run instead of ``run`` when torch's FLOP counter cannot see the
    # candidate's kernels (a library's own int8 ops): the same computation at full precision.
    count: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None


@dataclass
class Context:
    """What a worker gives a peer: the job's sampling settings, fresh pipelines and calibration seeds."""

    model: str
    sampler: str
    steps: int
    guidance: float
    fresh_pipe: Callable[..., object]  # fresh_pipe(sampler=None) -> a new pipeline with its own weights
    calib_labels: torch.Tensor
    calib_seeds: list[int]
    shared: dict = field(default_factory=dict)  # per-group cache (e.g. MagCache's calibrated ratios)

    def sample(self, pipe, labels: torch.Tensor, seeds: list[int], steps: int | None = None) -> torch.Tensor:
        return sample(pipe, labels, seeds, steps or self.steps, self.guidance, batch_size=max(1, len(labels)))


@dataclass
class PeerSpec:
    name: str
    title: str
    models: tuple[str, ...]  # the embedded models it applies to
    package: str  # import name, checked before a worker is started
    requirement: str  # what to install
    knobs: dict[str, object]  # settings and their defaults
    open: Callable[[Context, dict], Candidate]
    url: str = ""

    def available(self) -> str | None:
        """None if the peer's package is importable, else why not (one line)."""
        try:
            found = importlib.util.find_spec(self.package) is not None
        except ModuleNotFoundError:  # the parent of a dotted name is missing
            found = False
        if not found:
            return f"{self.requirement} is not installed (pip install 'diffaccel[peers]')"
        return None

    def version(self) -> str | None:
        dist = re.split(r"[=<>!~ ]", self.requirement)[0]
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None


def _settings(spec_knobs: dict, settings: dict) -> dict:
    return {**spec_knobs, **settings}


# -- diffusers hooks (DiT) ---------------------------------------------------------------------------------
def _diffusers_hooked(ctx: Context, apply: Callable[[torch.nn.Module, dict], None]) -> Candidate:
    """A fresh DiT with a diffusers hook applied. The DiT has no CacheMixin, so (as diffusers'
    own pipelines do) every forward runs inside a cache context, and the hooks' state, which
    diffusers does not reset between calls on such models, is reset before each pipeline call."""
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    pipe = ctx.fresh_pipe()
    model = pipe.transformer
    current = {"t": 1000.0}  # the running timestep, for hooks that ask for it
    apply(model, current)
    original = pipe.denoise

    def denoise(x, t, labels):
        current["t"] = float(t.reshape(-1)[0])
        _set_cache_context(model, CacheContext("cond"))  # guidance runs as one doubled batch
        try:
            return original(x, t, labels)
        finally:
            _set_cache_context(model, None)

    pipe.denoise = denoise

    def run(labels, seeds):
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()
        return ctx.sample(pipe, labels, seeds)

    return Candidate(run)


def diffusers_fbc(ctx: Context, settings: dict) -> Candidate:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    s = _settings(PEERS["diffusers-fbc"].knobs, settings)
    config = FirstBlockCacheConfig(threshold=s["threshold"])
    return _diffusers_hooked(ctx, lambda m, _: apply_first_block_cache(m, config))


def diffusers_taylorseer(ctx: Context, settings: dict) -> Candidate:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    s = _settings(PEERS["diffusers-taylorseer"].knobs, settings)
    config = TaylorSeerCacheConfig(cache_interval=s["interval"], max_order=s["order"],
                                   disable_cache_before_step=s["warmup"],
                                   taylor_factors_dtype=getattr(torch, s["factors_dtype"]),
                                   cache_identifiers=list(s["identifiers"]))
    return _diffusers_hooked(ctx, lambda m, _: apply_taylorseer_cache(m, config))


def diffusers_pab(ctx: Context, settings: dict) -> Candidate:
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    s = _settings(PEERS["diffusers-pab"].knobs, settings)

    def apply(model, current):
        apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=s["skip_range"],
            spatial_attention_timestep_skip_range=tuple(s["timestep_range"]),
            current_timestep_callback=lambda: current["t"]))

    return _diffusers_hooked(ctx, apply)


def diffusers_fastercache(ctx: Context, settings: dict) -> Candidate:
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache
    from diffusers.hooks.faster_cache import _UNCOND_COND_INPUT_KWARGS_IDENTIFIERS

    s = _settings(PEERS["diffusers-fastercache"].knobs, settings)

    def apply(model, current):
        apply_faster_cache(model, FasterCacheConfig(
            spatial_attention_block_skip_range=s["skip_range"],
            spatial_attention_timestep_skip_range=tuple(s["timestep_range"]),
            unconditional_batch_skip_range=s["unconditional_skip"],
            current_timestep_callback=lambda: current["t"], tensor_format="BCHW",
            # the DiT's class labels are batched [unconditional, conditional] like its latents: the
            # default identifiers omit them, so skipping the unconditional half would mismatch batches
            _unconditional_conditional_input_kwargs_identifiers=[*_UNCOND_COND_INPUT_KWARGS_IDENTIFIERS,
                                                                  "class_labels"]))

    return _diffusers_hooked(ctx, apply)


def _magcache_ratios(ctx: Context) -> list[float]:
    """MagCache's calibration run (``calibrate=True``) on the calibration seeds, once per worker:
    the hook prints the per-step magnitude ratios at the end of the run, as its docs describe."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    if "magcache_ratios" not in ctx.shared:
        candidate = _diffusers_hooked(ctx, lambda m, _: apply_mag_cache(
            m, MagCacheConfig(calibrate=True, num_inference_steps=ctx.steps)))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            candidate.run(ctx.calib_labels, ctx.calib_seeds)
        found = re.findall(r"Calibration Complete[^\n]*\n(\[[^\]]*\])", printed.getvalue())
        if not found:
            raise RuntimeError("MagCache's calibration run printed no ratios")
        ctx.shared["magcache_ratios"] = [float(v) for v in ast.literal_eval(found[-1])]
    return ctx.shared["magcache_ratios"]


def diffusers_magcache(ctx: Context, settings: dict) -> Candidate:
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    s = _settings(PEERS["diffusers-magcache"].knobs, settings)
    ratios = _magcache_ratios(ctx)
    config = MagCacheConfig(threshold=s["threshold"], max_skip_steps=s["max_skip_steps"],
                            retention_ratio=s["retention_ratio"], num_inference_steps=ctx.steps, mag_ratios=ratios)
    candidate = _diffusers_hooked(ctx, lambda m, _: apply_mag_cache(m, config))
    candidate.notes = f"mag_ratios calibrated on {len(ctx.calib_seeds)} calibration images (not timed)"
    return candidate


# -- cache-dit (DiT) ----------------------------------------------------------------------------------
def _cachedit(ctx: Context, settings: dict, calibrator: bool) -> Candidate:
    """cache-dit's DBCache through its BlockAdapter (our pipeline class is not in its registry;
    the adapter is the one cache-dit registers for diffusers' DiT pipeline)."""
    import cache_dit
    from cache_dit import BlockAdapter, ForwardPattern
    from cache_dit.caching.patch_functors import DiTPatchFunctor

    name = "cachedit-dbcache-taylorseer" if calibrator else "cachedit-dbcache"
    s = _settings(PEERS[name].knobs, settings)
    pipe = ctx.fresh_pipe()
    adapter = BlockAdapter(pipe=pipe, transformer=pipe.transformer, blocks=pipe.transformer.transformer_blocks,
                           forward_pattern=ForwardPattern.Pattern_3, patch_functor=DiTPatchFunctor(),
                           check_forward_pattern=True)
    config = cache_dit.DBCacheConfig(Fn_compute_blocks=s["first_blocks"], Bn_compute_blocks=s["last_blocks"],
                                     max_warmup_steps=s["warmup"], residual_diff_threshold=s["threshold"],
                                     max_continuous_cached_steps=s["max_continuous"])
    calib = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=s["order"]) if calibrator else None
    cache_dit.enable_cache(adapter, cache_config=config, calibrator_config=calib)
    return Candidate(lambda labels, seeds: ctx.sample(pipe, labels, seeds),
                     close=lambda: cache_dit.disable_cache(pipe))


def cachedit_dbcache(ctx: Context, settings: dict) -> Candidate:
    return _cachedit(ctx, settings, calibrator=False)


def cachedit_dbcache_taylorseer(ctx: Context, settings: dict) -> Candidate:
    return _cachedit(ctx, settings, calibrator=True)


# -- U-Net peers ------------------------------------------------------------------------------------
def _scalar_timestep(pipe) -> None:
    """Call the U-Net with one timestep for the batch (it broadcasts it itself: same output), which
    is what Stable Diffusion pipelines pass and what DeepCache's helper reads with ``.item()``."""
    pipe.denoise = lambda x, t, labels: pipe.unet(x, t.reshape(-1)[0],
                                                  encoder_hidden_states=pipe.class_embedder(labels)).sample


def deepcache_sdhelper(ctx: Context, settings: dict) -> Candidate:
    """DeepCache's own ``DeepCacheSDHelper``: it needs only ``pipe.unet`` and ``pipe.scheduler``."""
    from DeepCache import DeepCacheSDHelper

    s = _settings(PEERS["deepcache-sdhelper"].knobs, settings)
    pipe = ctx.fresh_pipe()
    _scalar_timestep(pipe)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=s["interval"], cache_branch_id=s["branch"], skip_mode=s["skip_mode"])

    def run(labels, seeds):
        helper.enable()  # resets its state: each call is a fresh trajectory
        try:
            return ctx.sample(pipe, labels, seeds)
        finally:
            helper.disable()

    return Candidate(run)


def tgate(ctx: Context, settings: dict) -> Candidate:
    """T-GATE's own attention processor and schedule (``tgate.tgate_utils``), in the loop its
    ``TgateSDLoader`` adds to Stable Diffusion: after ``gate_step`` the cross-attention output is
    cached (the mean of both guidance branches) and sampling goes on without guidance."""
    from diffusers.utils.torch_utils import randn_tensor
    from tgate.tgate_utils import register_forward, tgate_scheduler

    from diffaccel.zoo.models import NULL_CLASS

    s = _settings(PEERS["tgate"].knobs, settings)
    if ctx.guidance <= 1.0:
        raise ValueError("T-GATE gates classifier-free guidance; it needs guidance > 1")
    pipe = ctx.fresh_pipe()
    unet, scheduler = pipe.unet, pipe.scheduler
    off = {"cache": False, "reuse": False}

    @torch.no_grad()
    def run(labels, seeds):
        gens = [torch.Generator().manual_seed(seed) for seed in seeds]
        size, channels = unet.config.sample_size, unet.config.in_channels
        x = randn_tensor((len(labels), channels, size, size), generator=gens) * scheduler.init_noise_sigma
        null = torch.full_like(labels, NULL_CLASS)
        scheduler.set_timesteps(ctx.steps)
        register_forward(unet, "Attention", ca_kward=off, sa_kward=off, keep_shape=True)
        for i, t in enumerate(scheduler.timesteps):
            guided = i < s["gate_step"]
            model_in = torch.cat([x, x]) if guided else x
            model_labels = torch.cat([null, labels]) if guided else labels
            ca, sa, keep = tgate_scheduler(cur_step=i, gate_step=s["gate_step"], sp_interval=s["sp_interval"],
                                           fi_interval=s["fi_interval"], warm_up=s["warm_up"])
            register_forward(unet, "Attention", ca_kward=ca, sa_kward=sa, keep_shape=keep)
            model_in = scheduler.scale_model_input(model_in, t)
            out = pipe.denoise(model_in, t.expand(model_in.shape[0]), model_labels)
            if guided:
                uncond, cond = out.chunk(2)
                out = uncond + ctx.guidance * (cond - uncond)
            x = scheduler.step(out, t, x).prev_sample
        return (x / 2 + 0.5).clamp(0, 1)

    return Candidate(run)


def tomesd(ctx: Context, settings: dict) -> Candidate:
    import tomesd as tome

    s = _settings(PEERS["tomesd"].knobs, settings)
    pipe = ctx.fresh_pipe()
    tome.apply_patch(pipe, ratio=s["ratio"], max_downsample=s["max_downsample"], sx=s["sx"], sy=s["sy"],
                     use_rand=s["use_rand"])
    return Candidate(lambda labels, seeds: ctx.sample(pipe, labels, seeds), close=lambda: tome.remove_patch(pipe))


# -- quantization libraries (both models) -----------------------------------------------------------------
def _with_our_cache(ctx: Context, pipe, keys: int | None, quantize: Callable[[torch.nn.Module], None],
                    counted: bool = True) -> Candidate:
    """Quantize the pipeline's denoiser with a peer library; with ``keys``, also run diffaccel's
    key-step caching plan (profiled on the full-precision model first, as a user would combine them).
    ``counted=False``: the library's kernels are invisible to torch's FLOP counter, so MACs are
    counted on a full-precision copy running the same plan."""
    import diffaccel

    plan = None
    if keys is not None:
        from diffaccel.methods.registry import build

        plan = build("keysteps", pipe, ctx.steps, guidance=ctx.guidance, keys=int(keys))

    def runner(the_pipe):
        def run(labels, seeds):
            if plan is None:
                return ctx.sample(the_pipe, labels, seeds)
            with diffaccel.accelerate(the_pipe, plan):
                return ctx.sample(the_pipe, labels, seeds)
        return run

    quantize(pipe.transformer if hasattr(pipe, 'transformer') else pipe.unet)
    notes = "" if plan is None else f"with diffaccel keysteps keys={keys}"
    if not counted:
        notes = "; ".join(filter(None, [notes, "MACs counted on the full-precision model (int8 kernels are "
                                               "invisible to torch's FLOP counter)"]))
    return Candidate(runner(pipe), notes=notes, count=None if counted else runner(ctx.fresh_pipe()))


TORCHAO_CONFIGS = {"int8-weight-only": "Int8WeightOnlyConfig", "int8-dynamic": "Int8DynamicActivationInt8WeightConfig"}


def torchao_int8(ctx: Context, settings: dict) -> Candidate:
    """torchao's ``quantize_(model, config)`` on the denoiser (its default filter: every nn.Linear)."""
    import torchao.quantization as tq

    s = _settings(PEERS["torchao"].knobs, settings)
    if s["config"] not in TORCHAO_CONFIGS:
        raise ValueError(f"unknown torchao config {s['config']!r}; choose {', '.join(TORCHAO_CONFIGS)}")
    config = getattr(tq, TORCHAO_CONFIGS[s["config"]])()
    return _with_our_cache(ctx, ctx.fresh_pipe(), s["cache_keys"], lambda model: tq.quantize_(model, config))


def quanto_int8(ctx: Context, settings: dict) -> Candidate:
    """optimum-quanto's ``quantize`` + ``freeze``; with int8 activations, their scales come from its
    ``Calibration`` context over a run of the calibration seeds (as its docs prescribe)."""
    from optimum import quanto

    s = _settings(PEERS["quanto"].knobs, settings)
    pipe = ctx.fresh_pipe()
    activations = getattr(quanto, s["activations"]) if s["activations"] else None

    def quantize(model):
        quanto.quantize(model, weights=getattr(quanto, s["weights"]), activations=activations)
        if activations is not None:
            with quanto.Calibration():
                ctx.sample(pipe, ctx.calib_labels, ctx.calib_seeds)
        quanto.freeze(model)

    return _with_our_cache(ctx, pipe, s["cache_keys"], quantize, counted=False)


PEERS: dict[str, PeerSpec] = {spec.name: spec for spec in [
    PeerSpec("diffusers-fbc", "diffusers FirstBlockCache", ("dit",), "diffusers", "diffusers",
             {"threshold": 0.05}, diffusers_fbc),
    PeerSpec("diffusers-taylorseer", "diffusers TaylorSeer", ("dit",), "diffusers", "diffusers",
             {"interval": 5, "order": 1, "warmup": 3, "factors_dtype": "bfloat16",
              # without these identifiers TaylorSeer hooks nothing on a DiT (see PEERS.md)
              "identifiers": [r"^transformer_blocks\.\d+\.attn\d?"]}, diffusers_taylorseer),
    PeerSpec("diffusers-pab", "diffusers Pyramid Attention Broadcast", ("dit",), "diffusers", "diffusers",
             {"skip_range": 2, "timestep_range": [100, 800]}, diffusers_pab),
    PeerSpec("diffusers-fastercache", "diffusers FasterCache", ("dit",), "diffusers", "diffusers",
             {"skip_range": 2, "timestep_range": [-1, 681], "unconditional_skip": 5}, diffusers_fastercache),
    PeerSpec("diffusers-magcache", "diffusers MagCache", ("dit",), "diffusers", "diffusers",
             {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2}, diffusers_magcache),
    PeerSpec("cachedit-dbcache", "cache-dit DBCache", ("dit",), "cache_dit", "cache-dit==1.5.3",
             {"threshold": 0.08, "first_blocks": 1, "last_blocks": 0, "warmup": 4, "max_continuous": -1},
             cachedit_dbcache),
    PeerSpec("cachedit-dbcache-taylorseer", "cache-dit DBCache + TaylorSeer calibrator", ("dit",), "cache_dit",
             "cache-dit==1.5.3",
             {"threshold": 0.08, "first_blocks": 1, "last_blocks": 0, "warmup": 4, "max_continuous": -1,
              "order": 1}, cachedit_dbcache_taylorseer),
    PeerSpec("deepcache-sdhelper", "DeepCache (DeepCacheSDHelper)", ("unet",), "DeepCache", "DeepCache==0.1.1",
             {"interval": 3, "branch": 0, "skip_mode": "uniform"}, deepcache_sdhelper),
    PeerSpec("tgate", "T-GATE", ("unet",), "tgate", "tgate==1.0.0",
             {"gate_step": 10, "sp_interval": 5, "fi_interval": 1, "warm_up": 2}, tgate),
    PeerSpec("tomesd", "ToMe for SD", ("unet",), "tomesd", "tomesd==0.1.3",
             # tiny U-Nets have attention at 8x8 and below only: max_downsample=2 (PEERS.md);
             # use_rand=False keeps runs reproducible across the interleaved repeats
             {"ratio": 0.5, "max_downsample": 2, "sx": 2, "sy": 2, "use_rand": False}, tomesd),
    PeerSpec("torchao", "torchao int8", ("dit", "unet"), "torchao", "torchao==0.18.0",
             {"config": "int8-weight-only", "cache_keys": None}, torchao_int8),
    PeerSpec("quanto", "optimum-quanto int8", ("dit", "unet"), "optimum.quanto", "optimum-quanto==0.2.7",
             {"weights": "qint8", "activations": None, "cache_keys": None}, quanto_int8),
]}


def peer_versions() -> dict[str, str | None]:
    out = {}
    for spec in PEERS.values():
        dist = re.split(r"[=<>!~ ]", spec.requirement)[0]
        out[dist] = spec.version()
    return out
