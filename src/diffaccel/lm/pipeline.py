"""``DLMPipeline``: prompts in, answers out, with the model, tokenizer and layout in one object.

``pipe(problems)`` decodes with the LLaDA sampler; inside ``diffaccel.accelerate(pipe, lm_plan)``
(``lm_accelerate``) the same call decodes as the plan says. The pipeline keeps no state between
calls: every call builds its caches afresh and returns what it cost in ``DLMOutput``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from transformers import BertForMaskedLM

from diffaccel.errors import WeightsError
from diffaccel.lm.kvcache import MacCounter
from diffaccel.lm.model import ANSWER_LENGTH, PROMPT_LENGTH, forward_macs
from diffaccel.lm.plan import LMPlanError
from diffaccel.lm.sampler import check_schedule, decode, whole_number
from diffaccel.lm.tasks import Problem
from diffaccel.lm.tokenizer import CharTokenizer

WEIGHTS_DIR = Path(str(resources.files("diffaccel.zoo") / "weights" / "dlm"))


@dataclass
class DLMOutput:
    texts: list[str]  # decoded answers (up to the first <eos>)
    tokens: torch.Tensor  # [N, answer_length] answer token ids
    macs: int  # multiply-accumulates executed
    full_macs: int  # what the uncached LLaDA sampler spends on the same call (steps x full forwards)
    forwards: int


class DLMPipeline:
    """A masked diffusion LM with its tokenizer and its fixed ``[prompt | answer]`` layout."""

    kind = "dlm"
    _lm_run = None  # set on the instance by ``lm_accelerate`` while a plan applies

    def __init__(self, model: BertForMaskedLM, tokenizer: CharTokenizer, prompt_length: int = PROMPT_LENGTH,
                 answer_length: int = ANSWER_LENGTH, batch_size: int = 100):
        if not isinstance(model, BertForMaskedLM):
            raise TypeError(f"DLMPipeline runs a transformers BertForMaskedLM, not {type(model).__name__}")
        if model.config.vocab_size != len(tokenizer):
            raise WeightsError(f"the model has {model.config.vocab_size} token embeddings, the tokenizer "
                               f"{len(tokenizer)} tokens: they do not belong together")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.prompt_length, self.answer_length, self.batch_size = prompt_length, answer_length, batch_size

    @property
    def default_steps(self) -> int:
        """One token per step, LLaDA's default (steps = answer length)."""
        return self.answer_length

    def __call__(self, problems: list[Problem | str], steps: int | None = None, block_length: int | None = None,
                 batch_size: int | None = None) -> DLMOutput:
        """Answer ``problems`` (``Problem`` objects or prompt strings) in ``steps`` denoising steps
        (default: the answer length), semi-autoregressively in blocks of ``block_length`` tokens."""
        if isinstance(problems, (str, Problem)):
            raise LMPlanError("problems must be a list (of prompt strings or Problems); wrap one prompt in a list")
        if batch_size is not None and (not whole_number(batch_size) or batch_size < 1):
            raise LMPlanError(f"batch_size must be a whole number >= 1, not {batch_size!r}")
        run = self._lm_run
        plan = run.plan if run is not None else None
        steps = steps if steps is not None else self.default_steps
        block_length = check_schedule(self.answer_length, steps, block_length, plan)
        prompts = [p.prompt if isinstance(p, Problem) else p for p in problems]
        encoded = self.tokenizer.encode_prompts(prompts, self.prompt_length)  # errors before any work
        counter = MacCounter(self.model.config)
        answers = []
        size = batch_size or self.batch_size
        with torch.inference_mode():
            for start in range(0, len(prompts), size):
                prompt = encoded[start:start + size]
                masks = torch.full((prompt.shape[0], self.answer_length), self.tokenizer.mask_id)
                tokens = torch.cat([prompt, masks], dim=1)
                decode(self.model, tokens, self.prompt_length, self.tokenizer.mask_id, steps, block_length, plan,
                       counter)
                answers.append(tokens[:, self.prompt_length:].clone())
        tokens = torch.cat(answers) if answers else torch.zeros(0, self.answer_length, dtype=torch.long)
        length = self.prompt_length + self.answer_length
        full = steps * forward_macs(self.model.config, len(prompts), length, length, self.answer_length)
        out = DLMOutput([self.tokenizer.decode(row) for row in tokens], tokens, counter.macs, full, counter.forwards)
        if run is not None:
            run.stats.add(out)
        return out


def load_dlm(weights_dir: str | Path | None = None, batch_size: int = 100) -> DLMPipeline:
    """The shipped diffusion LM (or the one exported to ``weights_dir``) as a pipeline."""
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise WeightsError(f"no diffusion LM in {folder}: expected config.json and model.safetensors "
                           "(reinstall diffaccel, or train and export one with `diffaccel train --model dlm`)")
    tokenizer = CharTokenizer.load(folder)
    try:
        layout = json.loads((folder / "pipeline.json").read_text())
        model = BertForMaskedLM.from_pretrained(folder, use_safetensors=True, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a damaged folder
        raise WeightsError(f"the diffusion LM in {folder} is corrupt: {str(exc).splitlines()[0][:200]} "
                           "(reinstall diffaccel or re-export it)") from exc
    lengths = [layout.get(key) if isinstance(layout, dict) else None for key in ("prompt_length", "answer_length")]
    positions = model.config.max_position_embeddings
    if not all(isinstance(n, int) and n >= 1 for n in lengths) or sum(lengths) > positions:
        raise WeightsError(f"{folder / 'pipeline.json'} must give prompt_length and answer_length, whole numbers "
                           f">= 1 that fit the model's {positions} positions; got {lengths}: re-export the model")
    trained = _trained_lengths(folder)
    if trained is not None and trained != lengths:
        raise WeightsError(f"{folder / 'pipeline.json'} gives prompt and answer lengths {lengths}, but the model was "
                           f"trained on {trained} (training.json): its answers would be noise; re-export the model")
    return DLMPipeline(model, tokenizer, lengths[0], lengths[1], batch_size)


def _trained_lengths(folder: Path) -> list[int] | None:
    """The prompt and answer lengths ``training.json`` says the model was trained on (None: no such record)."""
    try:
        config = json.loads((folder / "training.json").read_text())["config"]
        return [int(config["prompt_length"]), int(config["answer_length"])]
    except (OSError, ValueError, KeyError, TypeError):
        return None
