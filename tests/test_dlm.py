"""The diffusion LM: tasks, tokenizer, model forward, samplers, LM plans and their executor."""

import itertools
import json
import shutil

import pytest
import torch
from transformers import BertForMaskedLM

import diffaccel
from diffaccel.cli.common import parse_params
from diffaccel.errors import WeightsError
from diffaccel.eval.cost import count_macs
from diffaccel.lm import (
    DLMPipeline,
    LMPlan,
    LMPlanError,
    held_out,
    is_correct,
    lm_accelerate,
    load_dlm,
    make_lm_plan,
    solve,
)
from diffaccel.lm import tasks as T
from diffaccel.lm.evaluate import compare, score
from diffaccel.lm.model import KVCache, block_causal_mask, build_model, forward_full, forward_macs, forward_partial
from diffaccel.lm.pipeline import WEIGHTS_DIR
from diffaccel.lm.search import parse_budget, search_lm
from diffaccel.lm.tokenizer import CharTokenizer
from diffaccel.lm.train import TrainConfig, export, main, train
from diffaccel.plan import Plan

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "initializer_range": 0.3}  # large random weights: outputs depend on context, so shortcuts show
shipped = pytest.mark.skipif(not (WEIGHTS_DIR / "model.safetensors").exists(), reason="shipped LM weights absent")


@pytest.fixture(scope="module")
def tiny_pipe() -> DLMPipeline:
    torch.manual_seed(0)
    tokenizer = CharTokenizer()
    return DLMPipeline(build_model(len(tokenizer), **TINY), tokenizer, batch_size=16)


@pytest.fixture(scope="module")
def problems() -> list:
    return held_out("calib", per_task=4)


def all_plans() -> list[LMPlan]:
    return [make_lm_plan("dkv-decode"), make_lm_plan("dkv-decode", refresh_every=3),
            make_lm_plan("dkv-greedy", window=2), make_lm_plan("prompt-cache"),
            make_lm_plan("block", block_size=4), make_lm_plan("block", block_size=12)]


# -- tasks and tokenizer -----------------------------------------------------------------------------
def test_task_answers_are_checked_from_the_prompt():
    assert solve("4821+0937=") == "05758"
    assert solve("sort:93810472") == "01234789"
    assert solve("rev:abcdef") == "fedcba"
    assert solve("b372k118q004?k") == "118"
    assert solve("close:([]{<") == ">})"
    assert is_correct("0012+0030=", "00042") and not is_correct("0012+0030=", "00043")
    assert not is_correct("0012+0030=", "42")
    assert not is_correct("close:(]", ")")  # an ill-formed prompt has no correct answer


def test_splits_are_disjoint_and_training_data_is_a_function_of_seed_and_step():
    evaluation, calibration = held_out("eval", 30), held_out("calib", 30)
    assert {p.task for p in evaluation} == set(T.LANGUAGE) and len({p.prompt for p in evaluation}) == len(evaluation)
    with_probe = held_out("eval", 30, tasks=T.TASKS)  # a task's problems don't depend on the other tasks asked for
    assert [p for p in with_probe if p.task != "get"] == evaluation and {p.task for p in with_probe} == set(T.TASKS)
    with pytest.raises(ValueError, match="unknown task"):
        held_out("eval", 3, tasks=("add", "nope"))
    assert {p.task for p in T.training_batch(0, 1, 400)} == set(T.LANGUAGE)
    assert all(T.split_of(p.prompt) == "eval" for p in evaluation)
    assert all(T.split_of(p.prompt) == "calib" for p in calibration)
    batch = T.training_batch(3, 17, 200)
    assert batch == T.training_batch(3, 17, 200) and batch != T.training_batch(3, 18, 200)
    assert all(T.split_of(p.prompt) == "train" and p.answer == solve(p.prompt) for p in batch)


def test_tokenizer_round_trip_layout_and_vocabulary_file(tmp_path):
    tok = CharTokenizer()
    text = "close:([{<>}])+=?0123456789" + "abcdefghijklmnopqrstuvwxyz"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("42") + [tok.eos_id] + tok.encode("7")) == "42"
    prompts = tok.encode_prompts(["1+2="], 8)
    assert prompts.tolist() == [[tok.pad_id] * 4 + tok.encode("1+2=")]
    assert tok.encode_answers(["3"], 3).tolist() == [tok.encode("3") + [tok.eos_id] * 2]
    tok.save(tmp_path)
    assert CharTokenizer.load(tmp_path).tokens == tok.tokens
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("A")
    with pytest.raises(ValueError, match="tokens; the model takes"):
        tok.encode_prompts(["1234567+1="], 8)
    (tmp_path / "vocab.json").write_text("{broken")
    with pytest.raises(WeightsError, match="corrupt"):
        CharTokenizer.load(tmp_path)


# -- the model forward -------------------------------------------------------------------------------
def test_forward_matches_the_transformers_forward_bidirectional_and_block_causal():
    torch.manual_seed(0)
    model = build_model(len(CharTokenizer()), **TINY).eval()
    tokens = torch.randint(3, 40, (2, 44))
    stock = BertForMaskedLM.forward(model, tokens).logits
    torch.testing.assert_close(forward_full(model, tokens), stock, rtol=1e-4, atol=1e-4)
    mask = block_causal_mask(32, 12, 4)
    ours = forward_full(model, tokens, attn_mask=mask)
    theirs = BertForMaskedLM.forward(model, tokens, attention_mask=mask[None, None].expand(2, 1, 44, 44)).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, stock, atol=1e-3)  # the mask matters


def test_partial_forward_over_a_cache_recomputes_only_its_positions():
    torch.manual_seed(0)
    model = build_model(len(CharTokenizer()), **TINY).eval()
    tokens = torch.randint(3, 40, (3, 44))
    cache = KVCache.empty(model, 3, 44)
    full = forward_full(model, tokens, cache=cache)
    index = torch.tensor([[40, 41, 43], [32, 35, 42], [33, 34, 36]])
    part = forward_partial(model, tokens, index, cache)
    torch.testing.assert_close(part, full.gather(1, index[..., None].expand(-1, -1, full.shape[-1])),
                               rtol=1e-5, atol=1e-5)


def test_analytic_macs_match_torch_flop_counter():
    torch.manual_seed(0)
    model = build_model(len(CharTokenizer()), **TINY).eval()
    cfg, tokens = model.config, torch.randint(3, 40, (2, 44))
    assert count_macs(lambda: forward_full(model, tokens, logits_from=32)) == forward_macs(cfg, 2, 44, 44, 12)
    cache = KVCache.empty(model, 2, 44)
    index = torch.tensor([[33, 40], [34, 35]])
    assert count_macs(lambda: forward_partial(model, tokens, index, cache)) == forward_macs(cfg, 2, 2, 44, 2)
    assert count_macs(lambda: forward_full(model, tokens[:, :36], attn_mask=block_causal_mask(32, 12, 4)[:36, :36],
                                           logits_from=32)) == forward_macs(cfg, 2, 36, 36, 4)


# -- plans: exactness, state, restore, errors -------------------------------------------------------
def _exact_guarantees(pipe, problems):
    base = pipe(problems)
    for plan in (make_lm_plan("none"), make_lm_plan("dkv-decode", refresh_every=1)):
        with lm_accelerate(pipe, plan) as run:
            out = pipe(problems)
        assert torch.equal(out.tokens, base.tokens), plan.method
        assert run.stats.macs == run.stats.full_macs
    outs = {}
    for cached in (True, False):
        with lm_accelerate(pipe, make_lm_plan("block", block_size=4, block_cache=cached)):
            outs[cached] = pipe(problems)
    assert torch.equal(outs[True].tokens, outs[False].tokens)  # the block cache is exact
    assert outs[True].macs < outs[False].macs / 2
    return base


def test_all_compute_plan_and_exact_caches_reproduce_tokens_random_model(tiny_pipe, problems):
    _exact_guarantees(tiny_pipe, problems)


@shipped
def test_shipped_model_answers_and_exact_plans():
    pipe = load_dlm()
    problems = held_out("eval", per_task=10)
    base = _exact_guarantees(pipe, problems)
    assert score(problems, base.texts)["accuracy"] >= 80.0
    with lm_accelerate(pipe, make_lm_plan("dkv-decode")) as run:
        cached = pipe(problems)
    assert run.stats.mac_ratio > 2.0 and score(problems, cached.texts)["accuracy"] >= 80.0


@shipped
@pytest.mark.parametrize("layout", [{"answer_length": 12}, {"prompt_length": 60, "answer_length": 12}, []])
def test_a_damaged_pipeline_file_is_a_weights_error(tmp_path, layout):
    """A missing key was a KeyError, lengths past the model's positions an IndexError mid-run."""
    folder = tmp_path / "dlm"
    shutil.copytree(WEIGHTS_DIR, folder)
    (folder / "pipeline.json").write_text(json.dumps(layout))
    with pytest.raises(WeightsError, match="must give prompt_length and answer_length"):
        load_dlm(folder)


@shipped
def test_a_pipeline_file_that_disagrees_with_the_training_record_is_refused(tmp_path):
    """Lengths that fit the model's positions but not the ones it was trained on ran at 0% accuracy."""
    folder = tmp_path / "dlm"
    shutil.copytree(WEIGHTS_DIR, folder)
    (folder / "pipeline.json").write_text(json.dumps({"prompt_length": 40, "answer_length": 12}))
    with pytest.raises(WeightsError, match=r"trained on \[32, 12\]"):
        load_dlm(folder)
    (folder / "training.json").unlink()  # no record to check against: the layout is taken as given
    assert load_dlm(folder).prompt_length == 40


def test_no_state_leaks_between_calls(tiny_pipe, problems):
    for plan in all_plans():
        with lm_accelerate(tiny_pipe, plan) as run:
            first, second = tiny_pipe(problems), tiny_pipe(problems)
        with lm_accelerate(tiny_pipe, plan):
            fresh = tiny_pipe(problems)
        with diffaccel.accelerate(tiny_pipe, plan):  # the one verb for every plan kind
            verb = tiny_pipe(problems)
        assert torch.equal(first.tokens, fresh.tokens) and torch.equal(second.tokens, fresh.tokens), plan.method
        assert torch.equal(verb.tokens, fresh.tokens), plan.method
        assert first.macs == second.macs == fresh.macs and run.stats.macs == 2 * fresh.macs, plan.method


def test_plans_skip_work_and_pipeline_is_restored_also_after_an_exception(tiny_pipe, problems):
    state = {k: v.clone() for k, v in tiny_pipe.model.state_dict().items()}
    attributes, model_attributes = dict(vars(tiny_pipe)), set(vars(tiny_pipe.model))
    base = tiny_pipe(problems)
    for plan in all_plans():
        with lm_accelerate(tiny_pipe, plan) as run:
            tiny_pipe(problems)
        assert run.stats.macs < run.stats.full_macs, plan.method
    with pytest.raises(RuntimeError, match="boom"):
        with lm_accelerate(tiny_pipe, make_lm_plan("dkv-decode")):
            raise RuntimeError("boom")
    assert vars(tiny_pipe) == attributes and tiny_pipe._lm_run is None
    assert set(vars(tiny_pipe.model)) == model_attributes
    assert all(torch.equal(v, state[k]) for k, v in tiny_pipe.model.state_dict().items())
    assert torch.equal(tiny_pipe(problems).tokens, base.tokens)


def test_plans_that_do_not_fit_fail_before_anything_changes(tiny_pipe, problems):
    attributes = dict(vars(tiny_pipe))
    image_plan = Plan(adapter="dit", model_class="X", units=["a"], num_steps=1, schedule=["C"])
    cases = [(tiny_pipe, make_lm_plan("block", block_size=5), "does not divide the answer length 12"),
             (tiny_pipe, make_lm_plan("dkv-greedy", window=20), "larger than the answer"),
             (tiny_pipe, LMPlan(method="dkv-decode", kind="dit"), "for a 'dit' model"),
             (tiny_pipe, LMPlan(method="none", answer_length=8), "answers of 8 tokens"),
             (tiny_pipe, image_plan, "applies an LMPlan"),
             (torch.nn.Linear(2, 2), make_lm_plan("none"), "diffusion LM pipeline")]
    for (target, plan, message), verb in itertools.product(cases, (lm_accelerate, diffaccel.accelerate)):
        with pytest.raises(LMPlanError, match=message):
            with verb(target, plan):
                pytest.fail("the block must not run")
        assert vars(tiny_pipe) == attributes
    with lm_accelerate(tiny_pipe, make_lm_plan("dkv-greedy", window=1)):
        with pytest.raises(LMPlanError, match="already applied"):
            with lm_accelerate(tiny_pipe, make_lm_plan("none")):
                pass
        with pytest.raises(LMPlanError, match="smaller than the 2 tokens"):
            tiny_pipe(problems, steps=6)
    with lm_accelerate(tiny_pipe, make_lm_plan("block", block_size=3)):
        with pytest.raises(LMPlanError, match="cannot be shared equally by 4 blocks"):
            tiny_pipe(problems, steps=6)
    with pytest.raises(LMPlanError, match="between 1 and the answer length"):
        tiny_pipe(problems, steps=13)
    # each returned something wrong without a word: [], an all-mask answer, one answer per character
    for call, message in [(dict(batch_size=-1), "batch_size must be a whole number >= 1"),
                          (dict(block_length=-4), "block_length must be a whole number >= 1"),
                          (dict(block_length=0), "block_length must be a whole number >= 1"),
                          (dict(steps=2.5), "steps must be a whole number"),  # had blamed the blocks
                          (dict(block_length=True), "block_length must be a whole number >= 1"),
                          (dict(batch_size=2.5), "batch_size must be a whole number >= 1")]:
        with pytest.raises(LMPlanError, match=message):
            tiny_pipe(problems, **call)
    with pytest.raises(LMPlanError, match="problems must be a list"):
        tiny_pipe(problems[0].prompt)
    assert vars(tiny_pipe) == attributes
    with pytest.raises(ValueError, match="from 'calib' or 'eval', not 'test'"):
        held_out("test")
    with pytest.raises(ValueError, match="per_task must be a whole number >= 1"):
        held_out("eval", per_task=-1)


def test_plan_json_round_trip_and_validation(tmp_path):
    plan = make_lm_plan("dkv-greedy", window=2, refresh_every=4)
    assert LMPlan.load(plan.save(tmp_path / "p.json")) == plan
    for bad, message in [({"method": "dkv-greedy"}, "window"), ({"method": "block"}, "block_size"),
                         ({"method": "block", "block_size": 4, "refresh_every": 2}, "refresh_every"),
                         ({"method": "dkv-decode", "refresh_every": -1}, "refresh_every"),
                         ({"method": "dkv-decode", "surprise": 1}, "surprise"),
                         ({"method": "dkv-decode", "refresh_every": True}, "refresh_every"),  # had become 1
                         ({"method": "dkv-greedy", "window": 2.5}, "window"),
                         ({"method": "block", "block_size": 5, "answer_length": 12}, "does not divide")]:
        with pytest.raises(LMPlanError, match=message):
            LMPlan.from_dict(bad)
    with pytest.raises(LMPlanError, match="unknown LM method"):
        make_lm_plan("fastest")
    (tmp_path / "bad.json").write_text('{"method": "dkv-dec')
    with pytest.raises(LMPlanError, match="not valid JSON"):
        LMPlan.load(tmp_path / "bad.json")
    (tmp_path / "v2.json").write_text(json.dumps({"version": 2, "method": "none"}))
    with pytest.raises(LMPlanError, match="version 2"):
        LMPlan.load(tmp_path / "v2.json")
    (tmp_path / "image.json").write_text(json.dumps({"version": 1, "adapter": "dit", "method": "fora"}))
    with pytest.raises(LMPlanError, match="is an image plan file, not an LM plan file: read it with diffaccel.Plan"):
        LMPlan.load(tmp_path / "image.json")


# -- evaluation and search ---------------------------------------------------------------------------
def test_compare_and_search_report_what_they_measured(tiny_pipe, problems):
    result = compare(tiny_pipe, make_lm_plan("dkv-decode"), problems, repeats=1)
    assert result["speedup_macs"] > 1.5 and result["speedup_wall"] > 0
    assert set(result["per_task"]) == set(T.LANGUAGE) and 0 <= result["accuracy"] <= 100
    assert parse_budget("accuracy>=-1", 90.0) == 89.0 and parse_budget("accuracy>=95", 90.0) == 95.0
    candidates = [make_lm_plan("dkv-decode", refresh_every=1), make_lm_plan("dkv-decode", refresh_every=3)]
    plan = search_lm(tiny_pipe, "accuracy>=-100", problems, candidates)
    assert plan.setting() == "refresh_every=3" and plan.params["search"]["chosen"]["speedup"] > 1
    with pytest.raises(LMPlanError, match="cannot read the budget"):
        search_lm(tiny_pipe, "psnr>=30", problems, candidates)


# -- training ----------------------------------------------------------------------------------------
def _tiny_config(**fields) -> TrainConfig:
    return TrainConfig(steps=4, batch=8, warmup=2, checkpoint_every=2, eval_every=0, overrides=json.dumps(TINY),
                       **fields)


def test_training_resumed_equals_uninterrupted_and_exports_a_loadable_model(tmp_path):
    train(_tiny_config(), tmp_path / "whole")
    train(_tiny_config(time_limit_min=1e-9), tmp_path / "split")  # stops after its first step
    with pytest.raises(FileExistsError, match="--resume"):
        train(_tiny_config(), tmp_path / "split")
    main(["--out", str(tmp_path / "split"), "--resume", "--steps", "4", "--batch", "8", "--warmup", "2",
          "--checkpoint-every", "2", "--eval-every", "0", "--overrides", json.dumps(TINY),
          "--export", str(tmp_path / "weights")])
    from safetensors.torch import load_file

    whole = load_file(tmp_path / "whole" / "checkpoint.safetensors")
    split = load_file(tmp_path / "split" / "checkpoint.safetensors")
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)
    pipe = load_dlm(tmp_path / "weights")
    assert len(pipe(held_out("eval", per_task=1)).texts) == len(T.LANGUAGE)
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"not a model")
    with pytest.raises(WeightsError, match="corrupt"):
        load_dlm(tmp_path / "weights")
    export(tmp_path / "whole", tmp_path / "w2")
    with pytest.raises(WeightsError, match="no diffusion LM"):
        load_dlm(tmp_path / "nothing")


def test_cli_trains_generates_compares_and_searches_the_lm(monkeypatch, capsys, tmp_path):
    from conftest import run_cli

    weights = tmp_path / "weights"
    code, _, err = run_cli(monkeypatch, capsys, "train", "--model", "dlm", "--out", tmp_path / "run", "--steps", "2",
                           "--batch", "8", "--warmup", "1", "--eval-every", "0", "--overrides", json.dumps(TINY),
                           "--export", weights)
    assert code == 0, err
    out = tmp_path / "gen"
    code, stdout, err = run_cli(monkeypatch, capsys, "generate", "--model", "dlm", "--weights", weights,
                                "--per-class", "2", "--method", "block", "--param", "block_size=4", "--compare",
                                "--out", out, "--save-plan", tmp_path / "block.json")
    assert code == 0, err
    record = json.loads((out / "record.json").read_text())
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert record["method"] == "block" and record["speedup_macs"] > 1 and record["speedup_wall"] > 0
    assert {"accuracy", "baseline_accuracy", "tokens_per_second"} <= record.keys()
    assert len(answers) == 2 * len(T.LANGUAGE) and "MACs" in stdout
    assert LMPlan.load(tmp_path / "block.json").block_size == 4
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", "dlm", "--weights", weights, "--per-class", "1",
                           "--plan", tmp_path / "block.json", "--out", tmp_path / "again")
    assert code == 0, err
    assert json.loads((tmp_path / "again" / "record.json").read_text())["method"] == "block"
    code, stdout, err = run_cli(monkeypatch, capsys, "search", "--model", "dlm", "--weights", weights,
                                "--budget", "accuracy>=-100", "--out", tmp_path / "search")
    assert code == 0, err
    chosen = LMPlan.load(tmp_path / "search" / "plan.json")
    assert chosen.method != "none" and "chosen" in stdout  # any plan meets a floor 100 points down
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", "dlm", "--weights", weights, "--per-class", "1",
                           "--plan", tmp_path / "search" / "plan.json", "--out", tmp_path / "searched")
    assert code == 0 and "unchecked" not in err, err  # the default steps are the searched ones: nothing to warn of
    code, stdout, err = run_cli(monkeypatch, capsys, "bench", "--model", "dlm", "--weights", weights, "--quick",
                                "--only", "baseline,block-4,search", "--budget", "accuracy>=-100",
                                "--out", tmp_path / "bench")
    assert code == 0, err
    bench = json.loads((tmp_path / "bench" / "results.json").read_text())
    rows = {row["name"]: row for row in bench["rows"]}
    assert list(rows) == ["baseline", "block-4", "search"] and rows["baseline"]["speedup_wall"] == 1.0
    assert rows["block-4"]["speedup_macs"] > 1 and rows["search"]["method"] != "none"
    assert all("--model dlm --only" in row["command"] for row in rows.values())
    assert "| block-4 |" in (tmp_path / "bench" / "results.md").read_text()
    for args, fragment in [(("generate", "--method", "dkv-nothing"), "unknown LM method"),
                           (("generate", "--compare"), "--compare needs a plan"),
                           (("search", "--budget", "psnr>=30"), "accuracy>=-1"),
                           (("bench", "--only", "block-99"), "unknown or no rows"),
                           (("quantize",), "generate, search, bench and train")]:
        code, _, err = run_cli(monkeypatch, capsys, args[0], "--model", "dlm", "--weights", weights,
                               "--out", tmp_path / "bad", *args[1:])
        lines = err.strip().splitlines()
        assert code == 2 and lines[-1].startswith("error: ") and fragment in lines[-1], err


def test_a_task_mix_chooses_the_training_tasks_and_bad_mixes_are_refused():
    assert {p.task for p in T.training_batch(0, 3, 50, {"get": 1.0})} == {"get"}
    assert T.training_batch(0, 3, 20) == T.training_batch(0, 3, 20, None)
    for bad in ({"nope": 1.0}, {"get": -1.0}, {"get": 0.0}, {}):
        with pytest.raises(ValueError, match="task mix"):
            T.training_batch(0, 3, 5, bad)


def test_methods_lists_every_lm_setting_a_param_can_set(monkeypatch, capsys):
    from conftest import run_cli

    code, stdout, err = run_cli(monkeypatch, capsys, "methods")
    assert code == 0, err
    lm_part = stdout.split("--model dlm", 1)[1]
    settable = set(LMPlan.model_fields) - {"version", "kind", "method", "answer_length", "params"}
    assert all(f"    {knob}=" in lm_part for knob in settable)
    assert make_lm_plan("block", **parse_params(["block_size=4", "block_cache=false"])).block_cache is False


def test_bench_refuses_a_step_count_some_rows_cannot_take_before_running_any(monkeypatch, capsys, tmp_path):
    from conftest import run_cli
    from diffaccel.lm.bench import ROWS, check_rows

    check_rows(list(ROWS), 12, 12)  # the default: one token per step fits every row
    with pytest.raises(LMPlanError, match="block-6") as info:
        check_rows(list(ROWS), 12, 5)
    assert "--only baseline," in str(info.value) and "block-4," not in str(info.value)
    code, _, err = run_cli(monkeypatch, capsys, "bench", "--model", "dlm", "--steps", "5", "--out", tmp_path / "b")
    assert code != 0 and "cannot run 5 steps" in err and not (tmp_path / "b").exists()


def test_plan_make_and_show_take_lm_plans(monkeypatch, capsys, tmp_path):
    from conftest import run_cli

    path = tmp_path / "greedy.json"
    code, _, err = run_cli(monkeypatch, capsys, "plan", "make", "dkv-greedy", "--model", "dlm", "--param", "window=4",
                           "--param", "refresh_every=8", "--out", path)
    assert code == 0, err
    made = LMPlan.load(path)
    assert (made.method, made.window, made.refresh_every) == ("dkv-greedy", 4, 8)
    code, stdout, err = run_cli(monkeypatch, capsys, "plan", "show", path)
    assert code == 0, err
    assert "dkv-greedy (window=4, refresh_every=8)" in stdout and f"--plan {path}" in stdout
    for args, fragment in [(("block",), "'block_size' is needed"), (("dkv-decode", "--interval", "3"), "--interval"),
                           (("dkv-nothing",), "unknown LM method"),
                           (("dkv-greedy", "--param", "window=40"), "larger than the answer (12 tokens)"),
                           (("block", "--param", "block_size=5"), "does not divide the answer length 12")]:
        bad = tmp_path / "x.json"
        code, _, err = run_cli(monkeypatch, capsys, "plan", "make", *args, "--model", "dlm", "--out", bad)
        assert code == 2 and fragment in err.strip().splitlines()[-1] and not bad.exists(), err
    code, _, err = run_cli(monkeypatch, capsys, "plan", "show", path, "--model", "dit")  # had been ignored
    assert code == 2 and "an LM plan for the 'dlm' model, not for 'dit'" in err
    (tmp_path / "odd.json").write_text('{"kind": 3}')  # an LM plan's field, of the wrong type: the LM reader says so
    code, _, err = run_cli(monkeypatch, capsys, "plan", "show", tmp_path / "odd.json")
    assert code == 2 and "invalid LM plan" in err


def test_compare_on_no_problems_says_so(tiny_pipe):
    """An empty problem list divided by zero (evaluate returns a NaN accuracy for it instead)."""
    with pytest.raises(ValueError, match="needs at least one problem"):
        compare(tiny_pipe, make_lm_plan("dkv-decode"), [], repeats=1)


def test_method_settings_with_an_lm_plan_file_are_refused(tmp_path):
    from diffaccel.cli.lm import lm_plan

    make_lm_plan("dkv-greedy", window=3).save(tmp_path / "p.json")
    with pytest.raises(ValueError, match="go with --method, not --plan"):
        lm_plan(None, tmp_path / "p.json", {"window": 5})
    assert lm_plan(None, tmp_path / "p.json", {}).setting() == make_lm_plan("dkv-greedy", window=3).setting()


def test_plan_show_runs_a_searched_lm_plan_at_the_steps_its_search_checked(tmp_path):
    """A plan searched at 5 steps was suggested with a command that runs the default 12, unchecked."""
    from diffaccel.cli.lm import describe_lm_plan

    searched = make_lm_plan("dkv-greedy", window=4).model_copy(update={"params": {"search": {"steps": 5}}})
    assert describe_lm_plan(searched, tmp_path / "p.json").endswith("--plan " + str(tmp_path / "p.json") + " --steps 5")
    assert "--steps" not in describe_lm_plan(make_lm_plan("dkv-greedy", window=4), tmp_path / "p.json")


def test_an_lm_plan_file_without_its_kind_is_shown_as_one(monkeypatch, capsys, tmp_path):
    from conftest import run_cli

    (tmp_path / "p.json").write_text('{"version": 1, "method": "block", "block_size": 4}')  # kind has a default
    code, stdout, err = run_cli(monkeypatch, capsys, "plan", "show", tmp_path / "p.json")
    assert code == 0 and "LM plan for a dlm model: block" in stdout, err  # had been read as an image plan


def test_search_lm_and_the_bench_refuse_what_they_cannot_run_before_any_work(tiny_pipe):
    from diffaccel.lm.bench import ROWS, check_rows

    with pytest.raises(LMPlanError, match="needs calibration problems"):
        search_lm(tiny_pipe, problems=[])  # had been a ZeroDivisionError
    with pytest.raises(LMPlanError, match="steps must be a whole number"):
        search_lm(tiny_pipe, steps=0)  # had been run as the default 12
    with pytest.raises(LMPlanError, match="cannot read the budget"):
        search_lm(tiny_pipe, "psnr>=30")
    with pytest.raises(LMPlanError, match="between 1 and the answer length 12, not 13") as info:
        check_rows(list(ROWS), 12, 13)
    assert "--only )" not in str(info.value)  # had suggested an empty --only


def test_the_longest_problems_fit_the_lengths_training_checks():
    from diffaccel.errors import DiffaccelError
    from diffaccel.lm.train import check_config, trained_tasks

    rng = __import__("random").Random(0)
    for task, (prompt, answer) in T.LONGEST.items():
        drawn = [T.make_problem(task, rng) for _ in range(3000)]
        assert max(len(p.prompt) for p in drawn) == prompt and max(len(p.answer) for p in drawn) == answer, task
    check_config(TrainConfig())
    for given, fragment in [({"answer_length": 9}, "give at least 26 and 10"),
                            ({"prompt_length": 16, "mix": '{"get": 1.0}'}, "give at least 30 and 3"),
                            ({"prompt_length": 60}, "exceed the model's 64 positions")]:
        with pytest.raises(DiffaccelError, match=fragment):
            check_config(TrainConfig(**given))
    assert trained_tasks({"get": 1.0, "add": 0}) == ("get",) and trained_tasks(None) == T.LANGUAGE


def test_the_lm_bench_adds_rows_to_its_results_and_resumes(monkeypatch, tmp_path):
    from diffaccel.cli import lm as cli_lm
    from diffaccel.lm import bench

    measured = []

    def fake_row(name, *args, **kwargs):
        measured.append(name)
        return {"name": name, "method": name, "setting": "", "accuracy": 100.0, "agreement": 100.0,
                "speedup_macs": 1.0, "speedup_wall": 1.0, "tokens_per_second": 1.0}

    monkeypatch.setattr(bench, "measure_row", fake_row)
    monkeypatch.setattr(cli_lm, "load_dlm", lambda weights=None: load_dlm())
    out = tmp_path / "b"
    cli_lm.lm_bench(out, "accuracy>=-1", 1, 1, None, ["baseline", "block-4"], None, threads=1)
    record = cli_lm.lm_bench(out, "accuracy>=-1", 1, 1, None, ["block-4"], None, threads=1)
    assert [r["name"] for r in record["rows"]] == ["baseline", "block-4"]  # the baseline row had been dropped
    assert record["rows"][1]["command"].endswith("--threads 1")
    cli_lm.lm_bench(out, "accuracy>=-1", 1, 1, None, ["baseline", "block-2", "block-4"], None, resume=True)
    assert measured == ["baseline", "block-4", "block-4", "block-2"]  # --resume measures only the missing row
    with pytest.raises(ValueError, match="other settings .*per_task 1 there, 2 now"):
        cli_lm.lm_bench(out, "accuracy>=-1", 2, 1, None, ["block-4"], None)


def test_the_lm_export_never_writes_over_a_folder_that_is_not_an_earlier_export(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty and not an earlier export"):
        main(["--out", str(tmp_path / "run"), "--steps", "1", "--export", str(tmp_path / "mine")])
    with pytest.raises(ValueError, match="would overwrite --out"):
        main(["--out", str(tmp_path / "run"), "--steps", "1", "--export", str(tmp_path / "run")])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and not (tmp_path / "run").exists()
