"""A character tokenizer with its own vocabulary file, and the fixed prompt/answer layout.

The language is a few dozen characters, so one token per character is exact and needs no learned
merges. The vocabulary is written by our code as ``vocab.json`` (a list of token strings, index =
id) and read back; three special tokens: ``<pad>`` (left-fills a short prompt), ``<mask>`` (the
absorbing state of masked diffusion) and ``<eos>`` (fills the answer region after the answer).

Every sequence has the same layout: ``prompt_length`` prompt positions (left-padded) followed by
``answer_length`` answer positions. Equal lengths let a batch share one step schedule, which is
what lets the cached decoders gather an equal number of positions from every row.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from diffaccel.errors import WeightsError

SPECIALS = ("<pad>", "<mask>", "<eos>")
CHARACTERS = string.digits + string.ascii_lowercase + "+=:?()[]{}<>"


class CharTokenizer:
    """Characters <-> ids, with ``pad_id``, ``mask_id`` and ``eos_id``."""

    def __init__(self, tokens: list[str] | None = None):
        self.tokens = list(tokens) if tokens is not None else [*SPECIALS, *CHARACTERS]
        if self.tokens[:3] != list(SPECIALS) or len(set(self.tokens)) != len(self.tokens):
            raise WeightsError(f"a vocabulary must start with {', '.join(SPECIALS)} and hold no duplicates")
        if any(len(t) != 1 for t in self.tokens[3:]):
            raise WeightsError("every non-special token of a character vocabulary is one character")
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.mask_id, self.eos_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} of {text!r} is not in the vocabulary") from None

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text up to the first ``<eos>``; pads are dropped, masks shown as ``_``."""
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i == self.eos_id:
                break
            if i != self.pad_id:
                out.append("_" if i == self.mask_id else self.tokens[i])
        return "".join(out)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / "vocab.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"type": "char", "tokens": self.tokens}, indent=1))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> CharTokenizer:
        path = Path(folder) / "vocab.json"
        try:
            data = json.loads(path.read_text())
            return cls(data["tokens"])
        except FileNotFoundError:
            raise WeightsError(f"no tokenizer vocabulary at {path}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise WeightsError(f"tokenizer vocabulary {path} is corrupt: {exc}") from None

    # -- the fixed layout ------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], prompt_length: int) -> torch.Tensor:
        """``[B, prompt_length]`` ids, left-padded with ``<pad>``."""
        rows = []
        for prompt in prompts:
            ids = self.encode(prompt)
            if len(ids) > prompt_length:
                raise ValueError(f"prompt {prompt!r} has {len(ids)} tokens; the model takes {prompt_length}")
            rows.append([self.pad_id] * (prompt_length - len(ids)) + ids)
        return torch.tensor(rows, dtype=torch.long)

    def encode_answers(self, answers: list[str], answer_length: int) -> torch.Tensor:
        """``[B, answer_length]`` ids: the answer, then ``<eos>`` to the end of the region."""
        rows = []
        for answer in answers:
            ids = self.encode(answer)
            if len(ids) > answer_length:
                raise ValueError(f"answer {answer!r} has {len(ids)} tokens; the answer region is {answer_length}")
            rows.append(ids + [self.eos_id] * (answer_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)
