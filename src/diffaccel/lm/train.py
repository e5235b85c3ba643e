"""Training the masked diffusion LM: ``python -m diffaccel.lm.train --out runs/dlm``.

Objective (LLaDA / MDLM): per sequence a masking ratio ``t ~ U(0, 1]`` (stratified over the
batch to lower the variance, each ``t`` still uniform), every answer token masked with
probability ``t``, prompt tokens never; cross-entropy on the masked answer tokens weighted ``1/t``,
summed and divided by the number of answer positions.

Half of the sequences (``block_fraction``) are trained under SDAR block-causal attention with a
block size drawn from the divisors of the answer length (2 to the whole answer), in BD3-LM's
vectorised layout ``[prompt | clean answer | noisy answer]`` (``model.block_training_layout``), so
the same weights decode with full attention (LLaDA sampler, dKV-Cache) and block by block with an
exact prefix cache (block diffusion). A block of the whole answer is the prefix-LM mask: the prompt
never sees the answer, which is what makes caching the prompt exact in that mode.

Reproducible from the seed: the problems of step ``s`` are ``tasks.training_batch(seed, s)`` and
every random draw of the step comes from a generator seeded with ``(seed, s)``; checkpoints hold
the model, its EMA and the optimizer state, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import BertConfig

from diffaccel.errors import DiffaccelError
from diffaccel.lm.evaluate import score
from diffaccel.lm.model import (
    ANSWER_LENGTH,
    MODEL_DEFAULTS,
    PROMPT_LENGTH,
    block_training_layout,
    build_model,
    forward_full,
)
from diffaccel.lm.pipeline import DLMPipeline
from diffaccel.lm.tasks import LANGUAGE, LONGEST, TASKS, Problem, check_mix, held_out, training_batch
from diffaccel.lm.tokenizer import CharTokenizer
from diffaccel.zoo import checkpoint
from diffaccel.zoo.train_options import (
    COMMON_HELP,
    check_export,
    check_folder,
    check_numbers,
    check_recipe,
    json_object,
)


@dataclass
class TrainConfig:
    steps: int = 9000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 300
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    block_fraction: float = 0.5
    seed: int = 0
    checkpoint_every: int = 200
    eval_every: int = 1000  # 0: no evaluation during training
    time_limit_min: float = 0.0  # 0: no limit; else stop (after a checkpoint) once exceeded
    overrides: str = "{}"  # JSON of model-config overrides (tiny models in tests)
    prompt_length: int = PROMPT_LENGTH
    answer_length: int = ANSWER_LENGTH
    mix: str = ""  # JSON task weights, e.g. {"add": 0.5, ...}; empty: tasks.TRAINING_MIX (shipped: SHIPPED_MIX)


HELP = {
    **COMMON_HELP,
    "batch": "problems per step",
    "block_fraction": "share of sequences trained block by block (block-causal attention; 0 to 1)",
    "eval_every": "steps between evaluations of the EMA weights (0: none during training)",
    "overrides": "JSON object of model-config overrides (tiny models in tests)",
    "prompt_length": "prompt tokens per sequence",
    "answer_length": "answer tokens per sequence (>= 2)",
    "mix": 'JSON task weights, e.g. {"add": 0.5, ...} (empty: the training mix)',
}
AT_LEAST = {"steps": 1, "batch": 1, "warmup": 0, "weight_decay": 0, "seed": 0, "checkpoint_every": 1,
            "eval_every": 0, "time_limit_min": 0, "prompt_length": 1, "answer_length": 2, "threads": 0}


def check_config(cfg: TrainConfig, threads: int = 0) -> None:
    """Refuse settings that cannot train, before any folder is made or any work is done."""
    check_numbers({**asdict(cfg), "threads": threads}, AT_LEAST, positive=("lr",),
                  fractions=("ema_decay", "block_fraction"))
    unknown = sorted(set(json_object("--overrides", cfg.overrides)) - set(BertConfig().to_dict()))
    if unknown:  # BertConfig would keep them as attributes no layer reads
        raise DiffaccelError(f"--overrides: {', '.join(unknown)} is not a model setting (BertConfig's: hidden_size, "
                             "num_hidden_layers, num_attention_heads, intermediate_size, ...)")
    mix = json_object("--mix", cfg.mix) if cfg.mix else None
    check_mix(mix)
    check_lengths(cfg, mix)


def trained_tasks(mix: dict[str, float] | None) -> tuple[str, ...]:
    """The tasks a run trains on: its mix's (those weighted above zero), else the default language."""
    return tuple(t for t in TASKS if mix and mix.get(t, 0) > 0) if mix else LANGUAGE


def check_lengths(cfg: TrainConfig, mix: dict[str, float] | None) -> None:
    """The prompt and answer regions must hold the longest problem of the tasks trained, and fit the
    model's positions together (a 9-token answer region had failed at the first 10-digit sort answer,
    a prompt past the positions with torch's IndexError)."""
    tasks = trained_tasks(mix)
    prompt = max(LONGEST[t][0] for t in tasks)
    answer = max(LONGEST[t][1] for t in tasks)
    positions = {**MODEL_DEFAULTS, **json.loads(cfg.overrides)}["max_position_embeddings"]
    if cfg.prompt_length < prompt or cfg.answer_length < answer:
        raise DiffaccelError(f"--prompt-length {cfg.prompt_length} and --answer-length {cfg.answer_length} cannot hold "
                             f"the longest problem of {', '.join(tasks)}: give at least {prompt} and {answer}")
    if cfg.prompt_length + cfg.answer_length > positions:
        raise DiffaccelError(f"--prompt-length {cfg.prompt_length} + --answer-length {cfg.answer_length} exceed the "
                             f"model's {positions} positions: shorten them, or raise max_position_embeddings in "
                             "--overrides")


def resumed_config(out: Path, given: dict) -> TrainConfig:
    """The saved recipe of the run in ``out``, with ``given`` settings that only say when to stop; a
    changed recipe is refused (the run would silently train on another one and record it as its own)."""
    if not (out / "checkpoint.safetensors").exists():
        raise DiffaccelError(f"nothing to resume in {out}: no checkpoint.safetensors there (leave out --resume to "
                             "start a run)")
    check_recipe(out, given)
    try:
        saved = json.loads((out / "train_config.json").read_text())  # a time limit is each invocation's own
        return TrainConfig(**{**saved, "time_limit_min": 0.0, **given})
    except (OSError, ValueError, TypeError) as exc:
        raise DiffaccelError(f"cannot read the run's recipe {out / 'train_config.json'}: {exc}") from None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _block_sizes(answer_length: int) -> list[int]:
    return [d for d in range(2, answer_length + 1) if answer_length % d == 0]


def masked_diffusion_loss(model: torch.nn.Module, tokenizer: CharTokenizer, problems: list[Problem],
                          gen: torch.Generator, cfg: TrainConfig) -> torch.Tensor:
    """The 1/t-weighted masked-token cross-entropy of one batch (see the module docstring)."""
    P, A = cfg.prompt_length, cfg.answer_length
    prompts = tokenizer.encode_prompts([p.prompt for p in problems], P)
    answers = tokenizer.encode_answers([p.answer for p in problems], A)
    rows = len(problems)
    eps = 1e-3
    u = (torch.rand(1, generator=gen) + torch.arange(rows) / rows) % 1.0
    t = 1.0 - (1.0 - eps) * u  # in (eps, 1]
    masked = torch.rand(rows, A, generator=gen) < t[:, None]
    noisy = torch.where(masked, torch.full_like(answers, tokenizer.mask_id), answers)
    blockwise = torch.rand(rows, generator=gen) < cfg.block_fraction
    sizes = _block_sizes(A)
    choice = torch.randint(len(sizes), (rows,), generator=gen)
    total = torch.zeros(())
    full = ~blockwise
    if full.any():
        logits = forward_full(model, torch.cat([prompts[full], noisy[full]], 1), logits_from=P)
        total = total + _weighted_ce(logits, answers[full], masked[full], t[full])
    if blockwise.any():
        layouts = [block_training_layout(P, A, sizes[c]) for c in choice[blockwise].tolist()]
        mask = torch.stack([m for m, _ in layouts])[:, None]
        tokens = torch.cat([prompts[blockwise], answers[blockwise], noisy[blockwise]], 1)
        logits = forward_full(model, tokens, positions=layouts[0][1][None], attn_mask=mask, logits_from=P + A)
        total = total + _weighted_ce(logits, answers[blockwise], masked[blockwise], t[blockwise])
    return total / (rows * A)


def _weighted_ce(logits: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return (ce.view(target.shape) * masked / t[:, None]).sum()


def _evaluate(ema: dict[str, torch.Tensor], cfg: TrainConfig, tokenizer: CharTokenizer) -> dict:
    """Exact match of the EMA weights on 20 calibration problems of each task trained (a progress signal)."""
    model = build_model(len(tokenizer), **json.loads(cfg.overrides))
    model.load_state_dict(ema)
    pipe = DLMPipeline(model, tokenizer, cfg.prompt_length, cfg.answer_length)
    problems = held_out("calib", per_task=20, tasks=trained_tasks(json.loads(cfg.mix) if cfg.mix else None))
    return score(problems, pipe(problems).texts)


def _log(out: Path, record: dict) -> None:
    with (out / "log.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig, out: Path, resume: bool = False) -> dict:
    """Train into ``out`` (``resume``: continue its checkpoint); returns the final step and losses."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.safetensors"
    if ckpt.exists() and not resume:
        raise FileExistsError(f"{ckpt} exists: pass --resume to continue it, or choose another --out")
    tokenizer = CharTokenizer()
    torch.manual_seed(cfg.seed)
    model = build_model(len(tokenizer), **json.loads(cfg.overrides))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step, losses = 0, []
    if ckpt.exists():
        step, meta = checkpoint.load(ckpt, model, ema, optimizer)
        losses = meta.get("losses", [])
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    start = time.monotonic()
    model.train()
    mix = json.loads(cfg.mix) if cfg.mix else None
    while step < cfg.steps:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        problems = training_batch(cfg.seed, step, cfg.batch, mix)
        loss = masked_diffusion_loss(model, tokenizer, problems, gen, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, value in model.state_dict().items():
                ema[name].lerp_(value, 1 - decay)
        losses.append(loss.item())
        step += 1
        timed_out = bool(cfg.time_limit_min) and time.monotonic() - start > cfg.time_limit_min * 60
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or timed_out:
            checkpoint.save(ckpt, model, ema, optimizer, step, {"losses": losses[-2000:]})
            record = {"step": step, "loss": sum(losses[-100:]) / len(losses[-100:]), "lr": lr_at(step - 1, cfg),
                      "minutes": round((time.monotonic() - start) / 60, 2)}
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                record["calib"] = _evaluate(ema, cfg, tokenizer)
            _log(out, record)
            print(json.dumps(record), flush=True)
        if timed_out:
            break
    return {"step": step, "loss_last": losses[-20:]}


EXPORT_FILES = ("config.json", "model.safetensors", "vocab.json", "pipeline.json", "training.json")


def export(out: Path, dest: Path) -> None:
    """Write the EMA weights of a run as the shipped folder: fp16 safetensors, config, vocabulary,
    layout (``pipeline.json``) and how it was trained (``training.json``)."""
    cfg = TrainConfig(**json.loads((out / "train_config.json").read_text()))
    tokenizer = CharTokenizer()
    model = build_model(len(tokenizer), **json.loads(cfg.overrides))
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    step, _ = checkpoint.load(out / "checkpoint.safetensors", model, ema, torch.optim.AdamW(model.parameters()))
    model.load_state_dict(ema)
    dest.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(dest)
    tokenizer.save(dest)
    (dest / "pipeline.json").write_text(json.dumps(
        {"prompt_length": cfg.prompt_length, "answer_length": cfg.answer_length}, indent=2))
    (dest / "training.json").write_text(json.dumps({"steps": step, "config": asdict(cfg)}, indent=2))


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--out`` run folder, ``--export`` weights folder, ``--steps``, ``--resume``,
    ``--time-limit-min``, ``--threads``, ``--overrides`` and the other ``TrainConfig`` fields."""
    parser = argparse.ArgumentParser(prog="diffaccel train --model dlm", description=__doc__.splitlines()[0])
    for f in fields(TrainConfig):  # only what is given: --resume tells a changed recipe from the saved one
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=argparse.SUPPRESS,
                            help=HELP[f.name] + (f" (default: {f.default})" if f.default != "" else ""))
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoint, config, log.jsonl)")
    parser.add_argument("--export", type=Path, help="after training, write the EMA weights here")
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: 0, torch's default)")
    args = vars(parser.parse_args(argv))
    out, dest, resume, threads = args.pop("out"), args.pop("export"), args.pop("resume"), args.pop("threads")
    check_folder("--out", out)
    cfg = resumed_config(out, args) if resume else TrainConfig(**args)
    check_config(cfg, threads)  # bad numbers, a malformed --overrides or --mix fail here, before any work
    check_folder("--export", dest)  # and files of anything but an earlier export are not written over
    check_export("--export", dest, EXPORT_FILES, {"--out": out})
    if threads:
        torch.set_num_threads(threads)
    result = train(cfg, out, resume=resume)
    print(json.dumps({"step": result["step"], "loss_last": result["loss_last"][-5:]}))
    if dest:
        export(out, dest)


if __name__ == "__main__":
    main()
