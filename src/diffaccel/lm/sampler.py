"""Decoding a masked diffusion LM: the LLaDA sampler and SDAR-style block diffusion.

LLaDA sampler (the baseline): the answer starts fully masked; at each of ``steps`` steps the
model predicts every masked token and the ``k`` most confident predictions are kept (low-confidence
remasking, deterministic: argmax tokens, softmax probability as confidence). With ``block_length``
smaller than the answer the answer is decoded block by block, left to right (semi-autoregressive),
each block getting an equal share of the steps; inside a block ``k`` is spread evenly over its
steps. Which positions a step computes is the runner's business (``kvcache``).

Block diffusion (SDAR): blocks of ``block_size`` tokens left to right, diffusion inside a block,
*block-causal* attention: the prompt sees itself, a block sees the prompt, earlier blocks and
itself. A finished block is then exact prefix context: with ``cache=True`` its keys and values are
computed once from its final tokens and kept (as in an autoregressive model), and each denoising
step computes only the current block. With ``cache=False`` every step recomputes the whole prefix
under the same mask, which gives the same tokens at a higher cost (the reference for the cache).
The model was trained with block-causal masks of every block size on half of its sequences, so it
supports this mode (``train.py``).
"""

from __future__ import annotations

import torch
from transformers import BertForMaskedLM

from diffaccel.lm.kvcache import CachedRunner, FullRunner, MacCounter
from diffaccel.lm.model import KVCache, block_causal_mask, forward_full, forward_partial
from diffaccel.lm.plan import LMPlan, LMPlanError


def transfer_counts(tokens: int, steps: int) -> list[int]:
    """Tokens to decode at each of ``steps`` steps: as equal as possible, the larger counts first."""
    base, extra = divmod(tokens, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def whole_number(value: object) -> bool:
    """Whether ``value`` is a whole number (an int, not a bool or a float)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_schedule(answer_length: int, steps: int, block_length: int | None, plan: LMPlan | None) -> int:
    """Raise ``LMPlanError`` unless the step schedule fits; returns the block length used."""
    if not whole_number(steps) or not 1 <= steps <= answer_length:
        raise LMPlanError(f"steps must be a whole number between 1 and the answer length {answer_length}, "
                          f"not {steps!r} "
                          "(a step that decodes nothing recomputes the same prediction)")
    if block_length is not None and (not whole_number(block_length) or block_length < 1):
        raise LMPlanError(f"block_length must be a whole number >= 1 (or None: one block), not {block_length!r}")
    blocks_from_plan = plan.block_size if plan is not None and plan.method == "block" else None
    if blocks_from_plan and block_length and block_length != blocks_from_plan:
        raise LMPlanError(f"block_length {block_length} conflicts with the plan's block_size {blocks_from_plan}")
    length = blocks_from_plan or block_length or answer_length
    if answer_length % length:
        raise LMPlanError(f"block length {length} does not divide the answer length {answer_length}")
    blocks = answer_length // length
    if steps % blocks or steps < blocks:
        raise LMPlanError(f"{steps} steps cannot be shared equally by {blocks} blocks of {length} tokens; "
                          f"use a multiple of {blocks} steps")
    if plan is not None and plan.method == "dkv-greedy":
        most = max(transfer_counts(length, steps // blocks))
        if plan.window < most:
            raise LMPlanError(f"window {plan.window} is smaller than the {most} tokens a step decodes; "
                              f"use window >= {most} or more steps")
    return length


def _keep_most_confident(tokens: torch.Tensor, prompt_length: int, logits: torch.Tensor,
                         positions: torch.Tensor, decodable: torch.Tensor, k: int, mask_id: int) -> torch.Tensor:
    """Write the ``k`` most confident predictions among ``decodable`` answer positions into
    ``tokens``; returns the chosen answer positions ``[B, k]``. ``<mask>`` and ``<pad>`` (ids
    ``mask_id`` and 0) are never predicted: a decoded token must leave the masked state."""
    rows, answer = decodable.shape
    logits = logits.float()
    logits[..., [0, mask_id]] = float("-inf")
    confidence, prediction = logits.softmax(-1).max(-1)
    conf = torch.full((rows, answer), float("-inf"))
    pred = torch.zeros((rows, answer), dtype=torch.long)
    conf.scatter_(1, positions, confidence)
    pred.scatter_(1, positions, prediction)
    computed = torch.zeros_like(decodable).scatter_(1, positions, True)
    conf = conf.masked_fill(~(decodable & computed), float("-inf"))
    chosen = conf.topk(k, dim=1).indices
    tokens[:, prompt_length:].scatter_(1, chosen, pred.gather(1, chosen))
    return chosen


def llada_decode(tokens: torch.Tensor, prompt_length: int, mask_id: int, steps: int, block_length: int,
                 runner: FullRunner) -> torch.Tensor:
    """Decode the masked answer of ``tokens`` ``[B, P + A]`` in place with low-confidence remasking."""
    answer = tokens.shape[1] - prompt_length
    blocks = answer // block_length
    step = 0
    for block in range(blocks):
        in_block = torch.zeros(tokens.shape[0], answer, dtype=torch.bool)
        in_block[:, block * block_length:(block + 1) * block_length] = True
        for k in transfer_counts(block_length, steps // blocks):
            masked = tokens[:, prompt_length:] == mask_id
            logits, positions, decodable = runner.logits(tokens, step, masked, in_block)
            chosen = _keep_most_confident(tokens, prompt_length, logits, positions, decodable, k, mask_id)
            runner.decoded(chosen)
            step += 1
    return tokens


def block_decode(model: BertForMaskedLM, tokens: torch.Tensor, prompt_length: int, mask_id: int, steps: int,
                 block_size: int, cache: bool, counter: MacCounter) -> torch.Tensor:
    """SDAR-style block diffusion of ``tokens`` ``[B, P + A]`` in place (see the module docstring)."""
    rows, length = tokens.shape
    answer = length - prompt_length
    blocks = answer // block_size
    kv = KVCache.empty(model, rows, length) if cache else None
    mask = block_causal_mask(prompt_length, answer, block_size)
    if cache:  # the prompt sees only itself, so its keys and values are final from the start
        counter.add(rows, prompt_length, prompt_length, 0)
        forward_full(model, tokens[:, :prompt_length], cache=kv, logits_from=prompt_length)
    for block in range(blocks):
        lo, hi = prompt_length + block * block_size, prompt_length + (block + 1) * block_size
        index = torch.arange(lo, hi).expand(rows, block_size)
        in_block = torch.zeros(rows, answer, dtype=torch.bool)
        in_block[:, lo - prompt_length:hi - prompt_length] = True
        for k in transfer_counts(block_size, steps // blocks):
            if cache:
                counter.add(rows, block_size, hi, block_size)
                logits = forward_partial(model, tokens, index, kv, key_end=hi)
            else:
                counter.add(rows, hi, hi, block_size)
                logits = forward_full(model, tokens[:, :hi], attn_mask=mask[:hi, :hi], logits_from=lo)
            masked = tokens[:, prompt_length:] == mask_id
            positions = index - prompt_length
            _keep_most_confident(tokens, prompt_length, logits, positions, masked & in_block, k, mask_id)
        if cache and block < blocks - 1:  # commit the finished block: its keys and values from its tokens
            counter.add(rows, block_size, hi, 0)
            forward_partial(model, tokens, index, kv, key_end=hi, logits=False)
    return tokens


def decode(model: BertForMaskedLM, tokens: torch.Tensor, prompt_length: int, mask_id: int, steps: int,
           block_length: int, plan: LMPlan | None, counter: MacCounter) -> torch.Tensor:
    """Decode one batch with the sampler and cache the plan asks for (None: the LLaDA baseline)."""
    method = plan.method if plan is not None else "none"
    if method == "block":
        return block_decode(model, tokens, prompt_length, mask_id, steps, plan.block_size, plan.block_cache,
                            counter)
    if method == "none":
        runner = FullRunner(model, prompt_length, counter)
    else:
        runner = CachedRunner(model, prompt_length, counter, method, plan.refresh_every, plan.window)
    return llada_decode(tokens, prompt_length, mask_id, steps, block_length, runner)
