"""Text side of the zoo: a word-level tokenizer over the caption language and a small ``CLIPTextModel``.

The tokenizer is a ``tokenizers`` WordLevel model (lower-casing, whitespace split, ``<s> ... </s>``
around every text) wrapped in transformers' ``PreTrainedTokenizerFast``; its ``tokenizer.json`` is
written by :func:`save_tokenizer`, so nothing is downloaded and ``from_pretrained`` reloads it
offline. Words outside the caption language become ``<unk>``. The empty prompt ``""`` (the null
condition of classifier-free guidance) is ``<s> </s>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from diffaccel.zoo.t2i import captions

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIALS = (PAD, UNK, BOS, EOS)
MAX_LENGTH = 16  # tokens per prompt (BOS and EOS included): captions use 10


def vocab() -> dict[str, int]:
    return {word: i for i, word in enumerate([*SPECIALS, *captions.vocabulary()])}


def build_tokenizer(max_length: int = MAX_LENGTH) -> PreTrainedTokenizerFast:
    """The word-level tokenizer, ``model_max_length`` = ``max_length``, padding on the right."""
    words = vocab()
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, words[BOS]), (EOS, words[EOS])])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=max_length, padding_side="right")


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """Write ``tokenizer.json`` and a minimal ``tokenizer_config.json`` that any transformers >= 4.45 reads."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": tokenizer.model_max_length,
              "padding_side": "right", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
              "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))


def text_encoder_config(**overrides) -> CLIPTextConfig:
    words = vocab()
    settings = dict(vocab_size=len(words), hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                    num_attention_heads=4, max_position_embeddings=128, projection_dim=128,
                    pad_token_id=words[PAD], bos_token_id=words[BOS], eos_token_id=words[EOS])
    return CLIPTextConfig(**{**settings, **overrides})


def build_text_encoder(**overrides) -> CLIPTextModel:
    """A small CLIP text transformer; 128 positions so PixArt's default 120-token prompts fit."""
    return CLIPTextModel(text_encoder_config(**overrides))


def tokenize(tokenizer: PreTrainedTokenizerFast, prompts: list[str], length: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, padded to ``length`` (the tokenizer's ``model_max_length`` by default),
    exactly as the diffusers pipelines tokenize prompts."""
    batch = tokenizer(prompts, padding="max_length", max_length=length or tokenizer.model_max_length,
                      truncation=True, return_tensors="pt")
    return batch.input_ids, batch.attention_mask
