"""U-Net peers: DeepCache's ``DeepCacheSDHelper``, T-GATE and ToMe, each in its natural form on a
Stable Diffusion pipeline; on the embedded U-Net, the least adaptation that makes its own code run
(see each function)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from diffaccel.bench.peers.base import Candidate, Context, PeerSpec, at_least
from diffaccel.calibration.workload import images_of


def _scalar_timestep(pipe) -> Callable[[], None]:
    """Call the U-Net with one timestep for the batch (it broadcasts it itself: same output), which
    is what Stable Diffusion pipelines pass and what DeepCache's helper reads with ``.item()``.
    Returns what puts the pipeline's own ``denoise`` back."""
    pipe.denoise = lambda x, t, labels: pipe.unet(x, t.reshape(-1)[0],
                                                  encoder_hidden_states=pipe.class_embedder(labels)).sample
    return lambda: vars(pipe).pop("denoise", None)


def deepcache_sdhelper(ctx: Context, settings: dict) -> Candidate:
    """DeepCache's own ``DeepCacheSDHelper``: it needs only ``pipe.unet`` and ``pipe.scheduler``."""
    from DeepCache import DeepCacheSDHelper  # optional: the peers extra

    s = SPECS["deepcache-sdhelper"].settings(settings)
    pipe = ctx.fresh_pipe()
    restore = _scalar_timestep(pipe) if ctx.embedded else lambda: None
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=s["interval"], cache_branch_id=s["branch"], skip_mode=s["skip_mode"])

    def run(call):
        helper.enable()  # resets its state: each call is a fresh trajectory
        try:
            return ctx.sample(pipe, call)
        finally:
            helper.disable()

    return Candidate(run, close=restore)


def tgate(ctx: Context, settings: dict) -> Candidate:
    """T-GATE: after ``gate_step`` the cross-attention output is cached (the mean of both guidance
    branches) and sampling goes on without guidance. On a stock pipeline, its own loader and
    ``pipe.tgate(...)``; on the embedded U-Net, the same processor and schedule in that loop."""
    s = SPECS["tgate"].settings(settings)
    if ctx.guidance <= 1.0:
        raise ValueError("T-GATE gates classifier-free guidance; it needs guidance > 1")
    if not ctx.embedded:
        return _tgate_stock(ctx, s)
    return _tgate_embedded(ctx, s)


def _tgate_stock(ctx: Context, s: dict) -> Candidate:
    from tgate import TgatePixArtAlphaLoader, TgateSDLoader  # optional: the peers extra

    pipe = ctx.fresh_pipe()
    loader = TgatePixArtAlphaLoader if hasattr(pipe, "transformer") else TgateSDLoader
    pipe = loader(pipe)
    knobs = {k: s[k] for k in ("gate_step", "sp_interval", "fi_interval", "warm_up")}

    def run(call):
        with torch.no_grad():
            out = pipe.tgate(**call.kwargs, **knobs, generator=call.generators(), output_type="pt")
        return images_of(out)

    return Candidate(run)


def _tgate_embedded(ctx: Context, s: dict) -> Candidate:
    from tgate.tgate_utils import register_forward, tgate_scheduler  # optional: the peers extra

    pipe = ctx.fresh_pipe()
    unet, scheduler = pipe.unet, pipe.scheduler
    off = {"cache": False, "reuse": False}

    @torch.no_grad()
    def run(call):
        labels = torch.as_tensor(call.kwargs["class_labels"])
        gens = [torch.Generator().manual_seed(seed) for seed in call.seeds]
        size, channels = unet.config.sample_size, unet.config.in_channels
        x = randn_tensor((len(labels), channels, size, size), generator=gens) * scheduler.init_noise_sigma
        null = torch.full_like(labels, pipe.num_classes)
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
    import tomesd as tome  # optional: the peers extra

    s = SPECS["tomesd"].settings(settings)
    pipe = ctx.fresh_pipe()
    tome.apply_patch(pipe, ratio=s["ratio"], max_downsample=s["max_downsample"], sx=s["sx"], sy=s["sy"],
                     use_rand=s["use_rand"])
    return Candidate(lambda call: ctx.sample(pipe, call), close=lambda: tome.remove_patch(pipe))

def _check_tgate(settings: dict) -> None:
    at_least(settings, 1, "gate_step", "sp_interval", "fi_interval")
    at_least(settings, 0, "warm_up")


SPECS: dict[str, PeerSpec] = {spec.name: spec for spec in [
    PeerSpec("deepcache-sdhelper", "DeepCache (DeepCacheSDHelper)", ("unet",), "DeepCache", "DeepCache==0.1.1",
             {"interval": 3, "branch": 0, "skip_mode": "uniform"}, deepcache_sdhelper,
             check=lambda settings: at_least(settings, 1, "interval")),
    PeerSpec("tgate", "T-GATE", ("unet", "pixart"), "tgate", "tgate==1.0.0",
             {"gate_step": 10, "sp_interval": 5, "fi_interval": 1, "warm_up": 2}, tgate, check=_check_tgate),
    PeerSpec("tomesd", "ToMe for SD", ("unet",), "tomesd", "tomesd==0.1.3",
             # tiny U-Nets have attention at 8x8 and below only: max_downsample=2 (PEERS.md);
             # use_rand=False keeps runs reproducible across the interleaved repeats
             {"ratio": 0.5, "max_downsample": 2, "sx": 2, "sy": 2, "use_rand": False}, tomesd),
]}
