"""The masked diffusion LM: a ``transformers`` BERT (``BertForMaskedLM``), bidirectional by design.

Why BERT: a masked diffusion LM is a masked-token predictor over a bidirectional transformer, which
is exactly BERT's masked-LM model, and BERT's *learned absolute* position embeddings matter here.
A first version used Llama with full attention (LLaDA's architecture); with rotary positions only,
every still-masked answer slot has the same query content, and a small model trained for minutes
could not learn where in the answer a slot sits: after 2000 steps it solved 0 % of the reversal,
addition and look-up problems (position-addressed copying) while sorting (content-addressed) was at
80 %. Absolute position embeddings give every slot its address from the first layer. They are also
what keeps cached keys valid: a key depends on its token, its fixed position and its context.

The weights live in a stock ``BertForMaskedLM`` (``save_pretrained`` / ``from_pretrained``). The
forward is ours, written over that class's own submodules (``query``, ``intermediate``, ``cls``,
...), because a key/value cache for diffusion decoding needs a forward that computes only *some*
positions (its queries) while attending to cached keys and values of the others.
``forward_full`` computes every position; ``forward_partial`` only the positions in ``index``,
reading the rest from a ``KVCache``. A test checks ``forward_full`` against the stock forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

PROMPT_LENGTH = 32
ANSWER_LENGTH = 12
MODEL_DEFAULTS = {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 6,
                  "max_position_embeddings": 64, "type_vocab_size": 1, "hidden_dropout_prob": 0.0,
                  "attention_probs_dropout_prob": 0.0, "tie_word_embeddings": False}


def build_config(vocab_size: int, **overrides) -> BertConfig:
    """The model's config. No ``pad_token_id``: it would freeze the pad embedding at zero, and a
    left-padded prompt's pads are ordinary, learned context; no dropout (the data is unlimited)."""
    return BertConfig(vocab_size=vocab_size, pad_token_id=None, eos_token_id=2, **{**MODEL_DEFAULTS, **overrides})


def build_model(vocab_size: int, **overrides) -> BertForMaskedLM:
    """A freshly initialised model (the seed set by the caller decides the weights)."""
    return BertForMaskedLM(build_config(vocab_size, **overrides))


@dataclass
class KVCache:
    """Per-layer key and value buffers ``[B, heads, L, head_dim]``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def empty(cls, model: BertForMaskedLM, batch: int, length: int) -> KVCache:
        cfg = model.config
        shape = (batch, cfg.num_attention_heads, length, cfg.hidden_size // cfg.num_attention_heads)
        dtype = model.cls.predictions.decoder.weight.dtype
        layers = cfg.num_hidden_layers
        return cls([torch.zeros(shape, dtype=dtype) for _ in range(layers)],
                   [torch.zeros(shape, dtype=dtype) for _ in range(layers)])


def _embed(model: BertForMaskedLM, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    emb = model.bert.embeddings
    x = emb.word_embeddings(tokens) + emb.position_embeddings(positions) + emb.token_type_embeddings.weight[0]
    return emb.LayerNorm(x)


def _qkv(layer, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    attn = layer.attention.self
    shape = (*x.shape[:2], attn.num_attention_heads, attn.attention_head_size)
    return tuple(proj(x).view(shape).transpose(1, 2) for proj in (attn.query, attn.key, attn.value))


def _finish(layer, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    batch, heads, n, head_dim = attended.shape
    out = layer.attention.output
    x = out.LayerNorm(out.dense(attended.transpose(1, 2).reshape(batch, n, heads * head_dim)) + x)
    return layer.output.LayerNorm(layer.output.dense(layer.intermediate(x)) + x)


def forward_full(model: BertForMaskedLM, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
                 attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                 logits_from: int = 0) -> torch.Tensor:
    """Logits ``[B, L - logits_from, V]`` computing every position of ``tokens`` ``[B, L]``.

    ``attn_mask`` (boolean, True = may attend) is None for bidirectional attention; ``positions``
    defaults to ``0..L-1``; with ``cache`` the keys and values of positions ``0..L-1`` are stored."""
    if positions is None:
        positions = torch.arange(tokens.shape[1])[None]
    x = _embed(model, tokens, positions)
    for i, layer in enumerate(model.bert.encoder.layer):
        q, k, v = _qkv(layer, x)
        if cache is not None:
            cache.keys[i][:, :, :tokens.shape[1]].copy_(k)
            cache.values[i][:, :, :tokens.shape[1]].copy_(v)
        x = _finish(layer, x, F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))
    return model.cls(x[:, logits_from:])


def forward_partial(model: BertForMaskedLM, tokens: torch.Tensor, index: torch.Tensor, cache: KVCache,
                    key_end: int | None = None, logits: bool = True) -> torch.Tensor | None:
    """Logits ``[B, n, V]`` of the positions ``index`` ``[B, n]`` only: their queries attend to the
    cache's keys and values of positions ``0..key_end-1``, into which their own fresh keys and values
    are written first. The other positions are not computed at all. ``logits=False`` skips the LM
    head (a forward that only writes the cache)."""
    x = _embed(model, tokens.gather(1, index), index)
    end = key_end if key_end is not None else tokens.shape[1]
    for i, layer in enumerate(model.bert.encoder.layer):
        q, k, v = _qkv(layer, x)
        where = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        cache.keys[i].scatter_(2, where, k)
        cache.values[i].scatter_(2, where, v)
        attended = F.scaled_dot_product_attention(q, cache.keys[i][:, :, :end], cache.values[i][:, :, :end])
        x = _finish(layer, x, attended)
    return model.cls(x) if logits else None


def forward_macs(config: BertConfig, rows: int, queries: int, keys: int, logits: int) -> int:
    """Multiply-accumulates of one forward: ``rows`` sequences, each computing ``queries`` positions
    that attend to ``keys`` positions, with ``logits`` positions through the masked-LM head.
    Counts the matrix products (projections, MLP, attention scores and mixing, head), as
    ``torch.utils.flop_counter`` does."""
    d, layers = config.hidden_size, config.num_hidden_layers
    per_query = 4 * d * d + 2 * d * config.intermediate_size
    attention = 2 * queries * keys * d
    return rows * (layers * (queries * per_query + attention) + logits * (d * d + d * config.vocab_size))


def block_ids(prompt_length: int, answer_length: int, block_size: int) -> torch.Tensor:
    """Block index of every position: the prompt is block 0, answer position j is ``1 + j // block_size``."""
    answer = 1 + torch.arange(answer_length) // block_size
    return torch.cat([torch.zeros(prompt_length, dtype=torch.long), answer])


def block_causal_mask(prompt_length: int, answer_length: int, block_size: int) -> torch.Tensor:
    """``[L, L]`` boolean mask for SDAR-style decoding: a position sees its own block and earlier ones."""
    ids = block_ids(prompt_length, answer_length, block_size)
    return ids[None, :] <= ids[:, None]


def block_training_layout(prompt_length: int, answer_length: int, block_size: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask and positions of the training sequence ``[prompt | clean answer | noisy answer]``
    (BD3-LM's vectorised form): clean block c sees the prompt and clean blocks <= c; noisy block c
    sees the prompt, clean blocks < c and noisy block c; the prompt sees only itself. One forward
    trains every block against exactly the context block decoding gives it."""
    ids = block_ids(prompt_length, answer_length, block_size)
    blk = torch.cat([ids, ids[prompt_length:]])
    kind = torch.cat([torch.zeros(prompt_length), torch.ones(answer_length), torch.full((answer_length,), 2.0)])
    q_blk, k_blk, q_kind, k_kind = blk[:, None], blk[None, :], kind[:, None], kind[None, :]
    mask = ((k_kind == 0)
            | ((q_kind == 1) & (k_kind == 1) & (k_blk <= q_blk))
            | ((q_kind == 2) & (k_kind == 1) & (k_blk < q_blk))
            | ((q_kind == 2) & (k_kind == 2) & (k_blk == q_blk)))
    positions = torch.cat([torch.arange(prompt_length + answer_length),
                           torch.arange(prompt_length, prompt_length + answer_length)])
    return mask, positions
