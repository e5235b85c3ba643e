"""The masked diffusion LM: a ``transformers`` Llama with full (bidirectional) attention.

Why Llama: LLaDA, the reference masked diffusion LM, *is* a Llama-style transformer (RMSNorm,
SwiGLU, rotary positions) run without the causal mask. Rotary positions are also what makes cached
keys reusable: a key is fixed by its token, its absolute position and its context, never shifted.

The weights live in a stock ``LlamaForCausalLM`` (saved and loaded with ``save_pretrained`` /
``from_pretrained``). The forward is ours, written over that class's own submodules
(``q_proj``, ``mlp``, ``rotary_emb``, ...), for two reasons: the stock forward is causal, and a
key/value cache for diffusion decoding needs a forward that computes only *some* positions (its
queries) while attending to cached keys and values of the others. ``forward_full`` computes every
position; ``forward_partial`` only the positions in ``index``, reading the rest from a ``KVCache``.
A test checks ``forward_full`` against the stock forward with a bidirectional mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

PROMPT_LENGTH = 32
ANSWER_LENGTH = 12
MODEL_DEFAULTS = {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 6,
                  "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def build_config(vocab_size: int, **overrides) -> LlamaConfig:
    """The model's config; ``is_causal=False`` records that attention is bidirectional."""
    fields = {**MODEL_DEFAULTS, **overrides}
    fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
    return LlamaConfig(vocab_size=vocab_size, is_causal=False, **fields)


def build_model(vocab_size: int, **overrides) -> LlamaForCausalLM:
    """A freshly initialised model (the seed set by the caller decides the weights)."""
    return LlamaForCausalLM(build_config(vocab_size, **overrides))


@dataclass
class KVCache:
    """Per-layer key and value buffers ``[B, heads, L, head_dim]`` (after rotary embedding)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def empty(cls, model: LlamaForCausalLM, batch: int, length: int) -> KVCache:
        cfg = model.config
        shape = (batch, cfg.num_key_value_heads, length, cfg.hidden_size // cfg.num_attention_heads)
        dtype = model.lm_head.weight.dtype
        layers = cfg.num_hidden_layers
        return cls([torch.zeros(shape, dtype=dtype) for _ in range(layers)],
                   [torch.zeros(shape, dtype=dtype) for _ in range(layers)])


def _qkv(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    shape = (*x.shape[:2], -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def _finish(layer, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    batch, heads, n, head_dim = attended.shape
    x = x + layer.self_attn.o_proj(attended.transpose(1, 2).reshape(batch, n, heads * head_dim))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def forward_full(model: LlamaForCausalLM, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
                 attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                 logits_from: int = 0) -> torch.Tensor:
    """Logits ``[B, L - logits_from, V]`` computing every position of ``tokens`` ``[B, L]``.

    ``attn_mask`` (boolean, True = may attend) is None for bidirectional attention; ``positions``
    defaults to ``0..L-1``; with ``cache`` the keys and values of positions ``0..L-1`` are stored."""
    inner = model.model
    x = inner.embed_tokens(tokens)
    if positions is None:
        positions = torch.arange(tokens.shape[1])[None]
    cos, sin = inner.rotary_emb(x, positions)
    for i, layer in enumerate(inner.layers):
        q, k, v = _qkv(layer, x, cos, sin)
        if cache is not None:
            cache.keys[i][:, :, :tokens.shape[1]].copy_(k)
            cache.values[i][:, :, :tokens.shape[1]].copy_(v)
        x = _finish(layer, x, F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))
    return model.lm_head(inner.norm(x[:, logits_from:]))


def forward_partial(model: LlamaForCausalLM, tokens: torch.Tensor, index: torch.Tensor, cache: KVCache,
                    key_end: int | None = None, logits: bool = True) -> torch.Tensor | None:
    """Logits ``[B, n, V]`` of the positions ``index`` ``[B, n]`` only: their queries attend to the
    cache's keys and values of positions ``0..key_end-1``, into which their own fresh keys and values
    are written first. The other positions are not computed at all. ``logits=False`` skips the LM
    head (a forward that only writes the cache)."""
    inner = model.model
    x = inner.embed_tokens(tokens.gather(1, index))
    cos, sin = inner.rotary_emb(x, index)
    end = key_end if key_end is not None else tokens.shape[1]
    for i, layer in enumerate(inner.layers):
        q, k, v = _qkv(layer, x, cos, sin)
        where = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        cache.keys[i].scatter_(2, where, k)
        cache.values[i].scatter_(2, where, v)
        attended = F.scaled_dot_product_attention(q, cache.keys[i][:, :, :end], cache.values[i][:, :, :end])
        x = _finish(layer, x, attended)
    return model.lm_head(inner.norm(x)) if logits else None


def forward_macs(config: LlamaConfig, rows: int, queries: int, keys: int, logits: int) -> int:
    """Multiply-accumulates of one forward: ``rows`` sequences, each computing ``queries`` positions
    that attend to ``keys`` positions, with ``logits`` positions projected to the vocabulary.
    Counts the matrix products (projections, MLP, attention scores and mixing, LM head), as
    ``torch.utils.flop_counter`` does."""
    d, heads, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    head_dim = d // heads
    kv = config.num_key_value_heads * head_dim
    per_query = d * heads * head_dim * 2 + 2 * d * kv + 3 * d * config.intermediate_size
    attention = 2 * queries * keys * heads * head_dim
    return rows * (layers * (queries * per_query + attention) + logits * d * config.vocab_size)


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
