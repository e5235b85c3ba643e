"""``--model dlm``: the diffusion language model through ``generate``, ``search`` and ``bench``.

A diffusion LM answers problems instead of drawing images, and its plans (``LMPlan``: dKV-Cache,
prompt caching, block diffusion) cache tokens rather than steps x units, so these commands take a
short path of their own: held-out problems of every task, exact-match accuracy, MACs and tokens per
second, written to ``record.json`` (and ``answers.jsonl``) in ``--out``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from diffaccel.cli.common import parse_params, rank_tag, setup
from diffaccel.eval.io import write_json
from diffaccel.lm.bench import ROWS, check_rows, run_rows, table
from diffaccel.lm.evaluate import compare as compare_plan
from diffaccel.lm.evaluate import run, score
from diffaccel.lm.executor import check_fits
from diffaccel.lm.pipeline import load_dlm
from diffaccel.lm.plan import LM_METHODS, LMPlan, make_lm_plan
from diffaccel.lm.sampler import whole_number
from diffaccel.lm.search import parse_budget, search_lm
from diffaccel.lm.tasks import held_out, is_correct
from diffaccel.plan_files import OWN_FIELD, plan_text

LM_MODEL = "dlm"
LM_HELP = f"dlm: the diffusion language model (methods {', '.join(m for m in LM_METHODS if m != 'none')})"


def lm_plan(method: str | None, plan_file: Path | None, settings: dict[str, Any]) -> LMPlan | None:
    """The LM plan of ``--method`` (with its settings) or ``--plan``; None for neither."""
    if method is not None and plan_file is not None:
        raise ValueError("give --method or --plan, not both")
    if plan_file is not None:
        if settings:  # a plan file's settings are its own: --param would be silently ignored
            raise ValueError(f"method settings ({', '.join(settings)}) go with --method, not --plan")
        return LMPlan.load(plan_file)
    if method is None:
        if settings:
            raise ValueError(f"method settings ({', '.join(settings)}) need --method")
        return None
    return make_lm_plan(method, **settings)


def one_process(parallel: Any = None) -> None:
    """The language model runs in one process: several (torchrun) would each run the whole job and
    write the same files."""
    if parallel is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"{rank_tag()}--model dlm runs in one process: drop --parallel and torchrun")


GENERATE_OPTIONS = frozenset({"model", "pipeline", "out", "method", "plan", "compare", "param", "save_plan", "weights",
                              "threads", "steps", "per_class", "parallel"})
SEARCH_OPTIONS = frozenset({"model", "pipeline", "budget", "objective", "out", "steps", "weights", "threads"})
PLAN_MAKE_OPTIONS = frozenset({"method", "model", "param", "weights", "out"})
BENCH_OPTIONS = frozenset({"model", "pipeline", "quick", "out", "only", "per_class", "steps", "threads", "timed_pairs",
                           "budget", "weights", "resume"})


def refuse_image_options(ctx: typer.Context, takes: frozenset[str]) -> None:
    """``--model dlm`` takes none of the image models' options: any other option the user gave is
    refused rather than silently ignored."""
    given = [name for name in ctx.params if name not in takes  # (typer vendors click: its enum, by name)
             and getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")]
    if given:
        named = {param.name: param.opts[0] for param in ctx.command.params if param.opts}  # as typed: --time
        flags = ", ".join(named.get(name, "--" + name.replace("_", "-")) for name in given)
        raise ValueError(f"--model dlm does not take {flags} (image-model options); drop "
                         f"{'it' if len(given) == 1 else 'them'}")


def generate_command(ctx: typer.Context) -> None:
    """``generate --model dlm``: the command's options checked and handed to :func:`lm_generate`."""
    refuse_image_options(ctx, GENERATE_OPTIONS)
    o = ctx.params
    setup(o["threads"])
    plan = lm_plan(o["method"], o["plan"], parse_params(o["param"]))  # LM_SETTINGS
    lm_generate(o["out"], plan, o["steps"], o["per_class"], o["compare"], 3, o["weights"], o["save_plan"],
                o["parallel"])


def plan_make_command(ctx: typer.Context) -> Path:
    """``plan make METHOD --model dlm``: the LM plan of the method and its ``--param`` settings, checked
    against the model it is for (the shipped one, or ``--weights``) and saved."""
    refuse_image_options(ctx, PLAN_MAKE_OPTIONS)
    o = ctx.params
    plan = make_lm_plan(o["method"], **parse_params(o["param"]))
    check_fits(load_dlm(o["weights"]), plan)  # a window or block size the answers cannot take fails here, not at use
    return plan.save(o["out"])


def is_lm_plan_file(path: Path) -> bool:
    """Whether ``path`` holds an LM plan (its own field and not the image plan's, as the readers tell
    them apart); anything unreadable is left to the image plan's reader, whose errors say what is wrong."""
    try:
        data = json.loads(plan_text(path))
    except (OSError, ValueError):
        return False
    lm_field, image_field = OWN_FIELD["LM plan"][0], OWN_FIELD["plan"][0]
    return isinstance(data, dict) and image_field not in data and (  # "kind" has a default: a file may leave it out
        lm_field in data or data.get("method") in LM_METHODS)


def searched_steps(plan: LMPlan | None) -> int | None:
    """The step count a searched LM plan was checked at (the plan itself runs at any)."""
    search = plan.params.get("search") if plan is not None else None
    steps = search.get("steps") if isinstance(search, dict) else None
    return steps if whole_number(steps) else None  # a hand-edited "abc" is no step count to suggest


def describe_lm_plan(plan: LMPlan, path: Path, model: str | None = None) -> str:
    """An LM plan in a few lines: the method, its settings, and what the file records besides
    (``model``: the ``--model`` the user named, which must be the one the plan is for)."""
    if model not in (None, plan.kind):
        raise ValueError(f"{path} is an LM plan for the {plan.kind!r} model, not for {model!r}; drop --model")
    lines = [f"LM plan for a {plan.kind} model: {plan.method} ({plan.setting()})"]
    if plan.answer_length is not None:
        lines.append(f"made for answers of {plan.answer_length} tokens")
    lines += [f"{key}: {value}" for key, value in plan.params.items()]
    searched = searched_steps(plan)
    at = f" --steps {searched}" if searched else ""  # what the search checked it at: another count is unchecked
    lines.append(f"run it with: diffaccel generate --model dlm --plan {path}{at}")
    return "\n".join(lines)


def search_command(ctx: typer.Context) -> None:
    """``search --model dlm``: the command's options checked and handed to :func:`lm_search`."""
    refuse_image_options(ctx, SEARCH_OPTIONS)
    o = ctx.params
    setup(o["threads"])
    lm_search(o["out"], o["budget"] or "accuracy>=-1", o["steps"], o["objective"].value, o["weights"])


def lm_generate(out: Path, plan: LMPlan | None, steps: int | None, per_task: int, compare: bool, repeats: int,
                weights: Path | None, save_plan: Path | None, parallel: Any = None) -> dict:
    """Answer ``per_task`` held-out problems of every task (with ``plan``); with ``compare``, against
    the uncached sampler on the same problems, interleaved. Writes record.json and answers.jsonl."""
    one_process(parallel)
    if compare and plan is None:
        raise ValueError("--compare needs a plan to compare with the uncached sampler: give --method or --plan")
    if save_plan is not None and (plan is None or save_plan.is_dir()):  # refused before the run, not after it
        raise ValueError("--save-plan needs a plan to save: give --method or --plan" if plan is None else
                         f"--save-plan {save_plan} is a folder: name a .json file")
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_dlm(weights)
    problems = held_out("eval", per_task=per_task)
    call = {"steps": pipe.default_steps if steps is None else steps}
    searched = searched_steps(plan)
    if searched is not None and call["steps"] != searched:
        typer.echo(f"warning: this plan's search checked it at {searched} steps; it runs at {call['steps']} here, "
                   f"unchecked (pass --steps {searched})", err=True)
    if compare:
        record = compare_plan(pipe, plan, problems, repeats=repeats, **call)
        output, _ = run(pipe, problems, plan, **call)  # the answers (compare keeps only their scores)
    else:
        output, seconds = run(pipe, problems, plan, **call)
        record = {"method": plan.method if plan else "none", "setting": plan.setting() if plan else "",
                  **score(problems, output.texts), "macs": output.macs, "seconds": seconds, "steps": call["steps"],
                  "tokens_per_second": len(problems) * pipe.answer_length / seconds}
    record = {"model": LM_MODEL, "weights": str(weights) if weights else None, **record}
    write_json(out / "record.json", record)
    with (out / "answers.jsonl").open("w") as handle:
        for problem, text in zip(problems, output.texts):
            handle.write(json.dumps({"task": problem.task, "prompt": problem.prompt, "answer": text,
                                     "correct": is_correct(problem.prompt, text)}) + "\n")
    if plan is not None and save_plan is not None:
        plan.save(save_plan)
    typer.echo(_summary(record))
    typer.echo(f"wrote {out / 'record.json'} and {out / 'answers.jsonl'}")
    return record


def lm_search(out: Path, budget: str, steps: int | None, objective: str, weights: Path | None) -> LMPlan:
    """The fastest LM plan within ``budget`` (``accuracy>=-1``: one point below the uncached sampler)."""
    one_process()
    if objective not in ("macs", "latency"):
        raise ValueError(f"--model dlm searches by macs or latency, not {objective}: its plans quantize nothing")
    parse_budget(budget, 100.0)  # a budget it cannot read is refused before the model loads
    out.mkdir(parents=True, exist_ok=True)  # a file in its way fails now, not after the search
    pipe = load_dlm(weights)
    plan = search_lm(pipe, budget, steps=steps, objective="wall" if objective == "latency" else "macs")
    plan.save(out / "plan.json")
    record = plan.params["search"]
    write_json(out / "search.json", record)
    chosen = record["chosen"]
    typer.echo(f"baseline accuracy {record['baseline_accuracy']:.1f} %, floor {record['floor']:.1f} %; " + (
        f"chosen {chosen['method']} {chosen['setting']}: {chosen['accuracy']:.1f} %, {chosen['speedup']:.2f}x"
        if chosen else "no candidate met the budget: the all-compute plan"))
    typer.echo(f"wrote {out / 'plan.json'} and {out / 'search.json'}")
    return plan


def lm_bench(out: Path, budget: str, per_task: int, repeats: int, steps: int | None, rows: list[str] | None,
             weights: Path | None, resume: bool = False, threads: int | None = None) -> dict:
    """Every LM method at its standard settings and the plan searched under ``budget`` (on
    calibration problems), each against the uncached sampler on ``per_task`` held-out problems of
    every task. Writes results.json (saved after every row; the rows of an earlier bench in ``out``
    with the same settings are kept, and with ``resume`` not measured again) and results.md."""
    names = rows or list(ROWS)
    parse_budget(budget, 100.0)  # the search row's budget, read before the model loads and any row runs
    settings = {"weights": str(weights) if weights else None, "budget": budget, "per_task": per_task,
                "repeats": repeats, "steps": steps}
    record = {"model": LM_MODEL, **earlier_bench(out / "results.json", settings), **settings}
    if resume:
        names = [n for n in names if n not in {row["name"] for row in record.get("rows", [])}]
        if not names:
            typer.echo(f"--resume: every row asked for is in {out / 'results.json'} already", err=True)
            return record
    pipe = load_dlm(weights)
    check_rows(names, pipe.answer_length, steps if steps is not None else pipe.default_steps)  # before out exists
    out.mkdir(parents=True, exist_ok=True)
    given = [f"--weights {weights}"] * bool(weights) + [f"--threads {threads}"] * bool(threads) + \
        [f"--steps {steps}"] * bool(steps)

    def command(name: str) -> str:  # what reproduces the row alone
        return " ".join([f"diffaccel bench --model dlm --only {name} --budget '{budget}' --per-class {per_task} "
                         f"--timed-pairs {repeats}", *given])

    record = run_rows(names, pipe, held_out("eval", per_task=per_task), held_out("calib", per_task=max(per_task, 20)),
                      record, lambda current: write_json(out / "results.json", current), command,
                      budget=budget, steps=steps, repeats=repeats, log=lambda line: typer.echo(line, err=True))
    (out / "results.md").write_text(f"# diffaccel bench: dlm, budget {budget}\n\n{table(record)}\n")
    return record


def earlier_bench(path: Path, settings: dict) -> dict:
    """The LM bench already in ``path`` (its rows are kept), if its settings are ``settings``; another
    bench's file there is refused rather than overwritten, so that no measured row is lost."""
    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict) or earlier.get("model") != LM_MODEL:
        raise ValueError(f"{path} is not an LM bench's results: give another --out")
    changed = [f"{k} {earlier.get(k)!r} there, {v!r} now" for k, v in settings.items() if earlier.get(k) != v]
    if changed:
        raise ValueError(f"{path} holds LM bench rows measured with other settings ({'; '.join(changed)}): "
                         "give another --out, or the same options to add rows to it")
    return earlier


def _summary(record: dict) -> str:
    line = f"{record['method']} {record['setting']}".strip() + f": accuracy {record['accuracy']:.1f} %"
    if "speedup_macs" in record:
        line += (f" (uncached {record['baseline_accuracy']:.1f} %), {record['speedup_macs']:.2f}x MACs, "
                 f"{record['speedup_wall']:.2f}x wall-clock")
    return line + f", {record['tokens_per_second']:.0f} tokens/s"
