"""Step runners: what one denoising step of the LLaDA sampler computes, with or without a cache.

A runner answers "logits of which answer positions, at what cost" for one step; the sampler then
keeps the most confident predictions. ``FullRunner`` is the uncached baseline (every position,
every step). ``CachedRunner`` implements dKV-Cache and prompt caching: the prompt's keys and values
are computed once (or at each refresh), and each step computes only its *compute set*, whose
queries attend to the cached keys and values of every other position:

* ``dkv-decode``:   still-masked positions + tokens decoded at the previous step (a decoded token's
  keys and values enter the cache one step late, once computed from the token itself);
* ``dkv-greedy``:   tokens decoded at the previous step + a window of the ``window`` left-most
  masked positions of the current block; only the window is eligible for decoding, masked tokens
  outside it keep stale keys and values until the next refresh (faster, lossier);
* ``prompt-cache``: every answer position (only the prompt is cached).

Step 0 and every ``refresh_every``-th step recompute everything and refill the cache. A runner is
created per batch of a call, so no state survives a call.
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM

from diffaccel.lm.model import KVCache, forward_full, forward_macs, forward_partial


class MacCounter:
    """Forwards and multiply-accumulates executed, counted from the shapes of each forward."""

    def __init__(self, config: BertConfig):
        self.config = config
        self.forwards = 0
        self.macs = 0

    def add(self, rows: int, queries: int, keys: int, logits: int) -> None:
        self.forwards += 1
        self.macs += forward_macs(self.config, rows, queries, keys, logits)


class FullRunner:
    """The uncached LLaDA step: every position recomputed, logits for the whole answer."""

    def __init__(self, model: BertForMaskedLM, prompt_length: int, counter: MacCounter):
        self.model, self.prompt_length, self.counter = model, prompt_length, counter

    def logits(self, tokens: torch.Tensor, step: int, masked: torch.Tensor, in_block: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [B, n, V], answer positions [B, n], decodable [B, A])`` for this step."""
        rows, length = tokens.shape
        answer = length - self.prompt_length
        self.counter.add(rows, length, length, answer)
        logits = forward_full(self.model, tokens, logits_from=self.prompt_length)
        return logits, torch.arange(answer).expand(rows, answer), masked & in_block

    def decoded(self, chosen: torch.Tensor) -> None:
        """Answer positions ``[B, k]`` the sampler just decoded (nothing to track without a cache)."""


class CachedRunner(FullRunner):
    """dKV-Cache-Decode, dKV-Cache-Greedy or prompt caching (see the module docstring)."""

    def __init__(self, model: BertForMaskedLM, prompt_length: int, counter: MacCounter, method: str,
                 refresh_every: int = 0, window: int | None = None):
        super().__init__(model, prompt_length, counter)
        if method not in ("dkv-decode", "dkv-greedy", "prompt-cache"):
            raise ValueError(f"CachedRunner runs dkv-decode, dkv-greedy or prompt-cache, not {method!r}")
        self.method, self.refresh_every, self.window = method, refresh_every, window
        self.cache: KVCache | None = None
        self.just_decoded: torch.Tensor | None = None

    def _refresh_due(self, step: int) -> bool:
        return self.cache is None or (self.refresh_every > 0 and step % self.refresh_every == 0)

    def _window(self, masked: torch.Tensor, in_block: torch.Tensor) -> torch.Tensor:
        open_here = masked & in_block
        return open_here & (open_here.cumsum(1) <= self.window)

    def logits(self, tokens: torch.Tensor, step: int, masked: torch.Tensor, in_block: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, length = tokens.shape
        answer = length - self.prompt_length
        decodable = self._window(masked, in_block) if self.method == "dkv-greedy" else masked & in_block
        if self._refresh_due(step):
            if self.cache is None:
                self.cache = KVCache.empty(self.model, rows, length)
                self.just_decoded = torch.zeros(rows, answer, dtype=torch.bool)
            self.counter.add(rows, length, length, answer)
            logits = forward_full(self.model, tokens, cache=self.cache, logits_from=self.prompt_length)
            self.just_decoded.zero_()
            return logits, torch.arange(answer).expand(rows, answer), decodable
        if self.method == "dkv-decode":
            compute = masked | self.just_decoded
        elif self.method == "dkv-greedy":
            compute = decodable | self.just_decoded
        else:
            compute = torch.ones_like(masked)
        positions = _row_positions(compute)
        self.counter.add(rows, positions.shape[1], length, positions.shape[1])
        logits = forward_partial(self.model, tokens, positions + self.prompt_length, self.cache)
        self.just_decoded.zero_()
        return logits, positions, decodable

    def decoded(self, chosen: torch.Tensor) -> None:
        self.just_decoded.scatter_(1, chosen, True)


def _row_positions(select: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` column indices of the True entries of ``select`` ``[B, A]``, which hold the same
    count in every row (all rows of a batch share one step schedule)."""
    counts = select.sum(1)
    if int(counts.min()) != int(counts.max()):
        raise RuntimeError("rows of a batch would compute different numbers of positions; "
                           "the sampler keeps one schedule per batch, so this is a bug")
    return select.nonzero()[:, 1].view(select.shape[0], -1)
