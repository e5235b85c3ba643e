"""Patch parallelism with stale activations (DistriFusion, Li et al. 2024) for DiT-style transformers.

Each rank denoises one band of patch rows of the latent: after the patch embedding it keeps only its
band's tokens, runs every block on them, and the bands are gathered again after the last block, so
the output layer (and the scheduler) see the whole image on every rank. Only self-attention needs
the other bands; its queries are local, its keys and values come from every band:

* during the first ``warmup_steps`` denoising steps of a run, synchronously: every rank gathers the
  other bands' keys and values of this very step (exact, up to the order of floating-point sums);
* after that, stale: a rank uses the other bands' keys and values of the *previous* step, gathered
  by an ``all_gather`` started then (``async_op=True``) and waited on now, so the exchange overlaps a
  whole step of computation; its own band's are fresh. Neighbouring steps' activations are close,
  which is what makes the staleness cheap in quality (DistriFusion's observation).

Per step that is one gather of each attention layer's keys and values (in the background) and one
synchronous gather of the last block's output. Ranks must make the same exchanges in the same order:
a static plan does (every rank follows the same schedule); a runtime rule (first-block caching)
decides on each rank's band and is refused.

Supported: ``DiTTransformer2DModel`` and ``PixArtTransformer2DModel`` (patch tokens, self-attention in
``attn1``; PixArt's cross-attention is left as it is). A U-Net's convolutions would need the rows
beyond each band's border (a stale halo exchange at every convolution), which is not implemented;
joint text-image attention (SD3, Flux) does not band-split either. Both are clear errors.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from diffaccel.adapters import find_denoiser
from diffaccel.parallel.agree import agreed_and_installed, applied_plan
from diffaccel.parallel.errors import ParallelError
from diffaccel.parallel.exchange import Pending, bounds, gather_cat, split_sizes, start_gather
from diffaccel.parallel.group import Group, current
from diffaccel.plan import Plan

SUPPORTED = ("DiTTransformer2DModel", "PixArtTransformer2DModel")
UNET_CLASSES = ("UNet2DConditionModel", "UNet2DModel")


def check_supported(model: torch.nn.Module) -> None:
    """Raise ``ParallelError`` unless ``model`` is a transformer whose tokens split into bands."""
    name = type(model).__name__
    if name in UNET_CLASSES:
        raise ParallelError(f"patch parallelism does not support a U-Net ({name}): its convolutions need the "
                            "rows across each band's border (a halo exchange at every convolution), which diffaccel "
                            "does not implement; use --parallel cfg or --parallel batch")
    if name not in SUPPORTED or not hasattr(model, "pos_embed") or not hasattr(model, "transformer_blocks"):
        raise ParallelError(f"patch parallelism splits the patch tokens of DiT-style transformers "
                            f"({', '.join(SUPPORTED)}); {name} has no such band split (joint text-image attention "
                            "or another layout): use --parallel cfg or --parallel batch")
    for index, block in enumerate(model.transformer_blocks):
        attn = getattr(block, "attn1", None)
        if attn is None or attn.spatial_norm is not None or attn.group_norm is not None or attn.is_cross_attention:
            raise ParallelError(f"patch parallelism needs plain self-attention in every block; block {index} of "
                                f"{name} has another kind")


def check_static(plan: Plan | None) -> None:
    """Raise ``ParallelError`` for a runtime-rule plan: each rank would decide on its own band, skip
    other blocks than the others and fall out of step with their exchanges."""
    if plan is not None and plan.rule is not None:
        raise ParallelError("a runtime-rule plan (first-block / dual-block caching) decides on each rank's own "
                            "band, so ranks would skip different blocks; patch parallelism needs a static plan")


class StaleSelfAttention:
    """An attention processor: local queries against every band's keys and values (fresh or stale)."""

    def __init__(self, owner: PatchParallel):
        self.owner = owner
        self.exchanges: dict[Any, Pending] = {}  # per guidance branch: the latest gather of keys and values

    def reset(self, wait: bool = True) -> None:
        if wait:
            for pending in self.exchanges.values():
                pending.wait()  # every started collective must complete on every rank
        self.exchanges.clear()

    def _keys_values(self, kv: torch.Tensor) -> torch.Tensor:
        owner, key = self.owner, self.owner.branch
        previous = self.exchanges.get(key)
        # a step's stale keys serve only the same batch and token bands (a bottleneck stage changes them)
        stale_ok = previous is not None and previous.buffers[0].shape[0] == kv.shape[0] \
            and previous.sizes == owner.token_sizes
        if owner.sync or not stale_ok:
            if previous is not None:
                previous.wait()
            done = start_gather(kv, owner.token_sizes, 1, owner.group, async_op=False)
            self.exchanges[key] = done
            return torch.cat(done.wait(), dim=1)
        pieces = previous.wait()
        pieces[owner.group.rank] = kv  # this band's own values are fresh; the others are one step old
        self.exchanges[key] = start_gather(kv, owner.token_sizes, 1, owner.group, async_op=True)
        return torch.cat(pieces, dim=1)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.dim() != 3:
            raise ParallelError("patch parallelism runs self-attention over patch tokens without a mask; this "
                                "attention layer got encoder states, a mask or a 4-D input")
        batch = hidden_states.shape[0]
        residual = hidden_states
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        inner = key.shape[-1]
        key, value = self._keys_values(torch.cat([key, value], dim=-1)).split([inner, value.shape[-1]], dim=-1)
        head_dim = inner // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.reshape(batch, -1, attn.heads, value.shape[-1] // attn.heads).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class PatchParallel:
    """Installs the band split on a DiT-style transformer for ``group``; a context manager, removable."""

    def __init__(self, model: torch.nn.Module, group: Group | None = None, warmup_steps: int = 1):
        check_supported(model)
        if warmup_steps < 0:
            raise ParallelError(f"--warmup-steps must be 0 or more, got {warmup_steps}")
        self.model, self.group = model, group or current()
        self.warmup_steps = max(1, warmup_steps)  # the first step has nothing stale to use
        self.patch = int(model.config.patch_size)
        self._signature = inspect.signature(type(model).forward)  # the class's: patches of forward do not matter
        self.processors = [StaleSelfAttention(self) for _ in model.transformer_blocks]
        self._saved: list[Any] = []
        self._handles: list[Any] = []
        self.token_sizes: list[int] = []
        self.band = (0, 0)
        self.sync, self.branch, self.last_t = True, 0, None
        self.steps: dict[int, int] = {}

    # -- install / remove ----------------------------------------------------------------------------
    def install(self) -> PatchParallel:
        check_static(applied_plan(self.model))  # before anything changes: the model stays as it was
        if self.group.world == 1 or self._handles:
            return self
        blocks = self.model.transformer_blocks
        self._saved = [block.attn1.processor for block in blocks]
        for block, processor in zip(blocks, self.processors):
            block.attn1.set_processor(processor)
        self._handles = [self.model.register_forward_pre_hook(self._start_call, with_kwargs=True),
                         self.model.pos_embed.register_forward_hook(self._keep_band),
                         blocks[-1].register_forward_hook(self._gather_bands)]
        return self

    def remove(self, wait: bool = True) -> None:
        """Restore the model; ``wait`` False (an error is unwinding, perhaps a lost rank) abandons the
        exchanges in flight instead of waiting on peers that may be gone."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.reset(wait)
        for block, processor in zip(self.model.transformer_blocks, self._saved):
            block.attn1.set_processor(processor)
        self._saved = []

    def reset(self, wait: bool = True) -> None:
        """Forget the stale activations (a new pipeline call starts); waits for exchanges in flight."""
        for processor in self.processors:
            processor.reset(wait)
        self.steps, self.branch, self.last_t = {}, 0, None

    def __enter__(self) -> PatchParallel:
        return self.install()

    def __exit__(self, kind: Any, *exc: Any) -> None:
        self.remove(wait=kind is None)

    # -- hooks ---------------------------------------------------------------------------------------
    def _start_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Which band (from the input's size), which run and guidance branch, and whether this step
        exchanges synchronously."""
        check_static(applied_plan(module))  # a plan applied after the split: refused before any exchange
        arguments = self._signature.bind(module, *args, **kwargs).arguments
        sample = arguments["hidden_states"]
        rows, cols = sample.shape[-2] // self.patch, sample.shape[-1] // self.patch
        if rows < self.group.world:
            raise ParallelError(f"an image of {rows} patch rows cannot be split into {self.group.world} bands")
        sizes = split_sizes(rows, self.group.world)
        self.token_sizes = [size * cols for size in sizes]
        self.band = bounds(self.token_sizes)[self.group.rank]
        timestep = arguments.get("timestep")
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep or 0.0)
        if self.last_t is None or t > self.last_t:  # the timesteps start again: a new pipeline call
            self.reset()
        self.branch = self.branch + 1 if t == self.last_t else 0  # another call at the same timestep
        self.last_t = t
        step = self.steps.get(self.branch, 0)
        self.steps[self.branch] = step + 1
        self.sync = step < self.warmup_steps

    def _keep_band(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        start, stop = self.band
        return output[:, start:stop]

    def _gather_bands(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return gather_cat(output, self.token_sizes, 1, self.group)


@contextmanager
def patch_parallel(pipe: Any, warmup_steps: int = 1, group: Group | None = None,
                   denoiser: str | None = None) -> Iterator[PatchParallel]:
    """Split ``pipe``'s transformer into bands of patch rows over the ranks inside the ``with`` block;
    the first ``warmup_steps`` steps of each call exchange synchronously, later ones use the other
    bands' keys and values from the previous step. Every rank must hold the same weights, scheduler
    and other models (and plan, when one is applied already): checked on entry. A runtime-rule plan
    is refused, applied before the split (on entry) or after it (at the first denoiser call)."""
    model, _ = find_denoiser(pipe, denoiser)
    wrapper = PatchParallel(model, group, warmup_steps)
    with agreed_and_installed(wrapper, model, pipe):
        yield wrapper
