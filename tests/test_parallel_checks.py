"""What the ranks must agree on and what the parallel modes refuse or report, on tiny stock pipelines:
every call argument, the scheduler and the pipeline's other models agreed before sampling; SDXL's
per-sample time ids split under CFG parallelism (Flux's shared position ids not); batch parallelism's
MACs those of one process when the calls differ in cost; runtime-rule plans refused under patch and
warned about under cfg from Python too; a hung rank told as a lost one.

Two-process work runs once (``diffaccel.parallel.spawn``), each rank saving what it saw; the tests judge it."""

from __future__ import annotations

import os
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler

import diffaccel
from diffaccel import methods
from diffaccel.calibration.workload import Call
from diffaccel.cli.generate import _rank_tagged
from diffaccel.errors import WorkloadError
from diffaccel.generate import GenerateConfig, run_generate
from diffaccel.parallel import ParallelError, cfg_parallel, patch_parallel, spawn
from diffaccel.parallel.cfg import CFGParallel, layout, slice_rows
from diffaccel.parallel.group import Group
from diffaccel.parallel.job import ParallelConfig, check_job
from diffaccel.quant.spec import QuantSpec
from diffaccel.targets import Target
from stock_pipelines import build, flux, sdxl

MIXED_STEPS = [{"class_labels": [1], "num_inference_steps": 2}, {"class_labels": [3], "num_inference_steps": 6}]


def stock_images(make, pipe=None) -> torch.Tensor:
    built, call = make()
    return (pipe or built)(**call, generator=torch.Generator().manual_seed(0), output_type="pt").images


def rule_plan(pipe):
    return methods.first_block_cache(pipe, threshold=0.6, warmup=1)


def mixed_steps_job(parallel: ParallelConfig | None, out: Path, plan: bool) -> dict | None:
    """Two calls of different step counts (so of different costs per image): one per rank in batch mode."""
    pipe, _ = build("dit")
    fora = methods.fora(pipe.transformer, 6, interval=2) if plan else None
    return run_generate(Target("dit-stock", pipe, MIXED_STEPS), GenerateConfig(per_class=1, steps=6), out,
                        plan=fora, compare=plan, progress=False, parallel=parallel)


# -- what each rank does ----------------------------------------------------------------------------------
def _attempt(results: dict, key: str, fn) -> None:
    try:
        results[key] = fn()
    except ParallelError as exc:
        results[key] = f"ParallelError: {exc}"
    except Exception:  # recorded, so the test shows it
        results[key] = f"failed: {traceback.format_exc()[-1500:]}"


def _entered(pipe) -> str:
    with cfg_parallel(pipe):
        return "entered"


def _agreement_checks(results: dict, rank: int, out: Path) -> None:
    pipe, call = build("sd-ddim-eta")
    prompts = [{**call, "prompt": p} for p in (call["prompt"] if rank == 0 else ["another prompt", "and one more"])]
    _attempt(results, "prompts", lambda: run_generate(Target("sd", pipe, prompts), GenerateConfig(per_class=1), out,
                                                      progress=False, parallel=ParallelConfig("cfg")))
    if rank == 1:
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    _attempt(results, "scheduler", lambda: _entered(pipe))
    pipe, _ = build("sd-ddim-eta")
    if rank == 1:
        with torch.no_grad():
            pipe.vae.decoder.conv_out.bias.add_(1e-3)
    _attempt(results, "vae", lambda: _entered(pipe))
    pipe, _ = build("sd-ddim-eta")
    one_seed = [{"prompt": "a red circle", "num_images_per_prompt": 2}]
    _attempt(results, "one-seed", lambda: run_generate(Target("sd", pipe, one_seed), GenerateConfig(per_class=1),
                                                       out, progress=False, parallel=ParallelConfig("batch")))


def _split_checks(results: dict) -> None:
    for name, make in (("sdxl", sdxl), ("flux", flux)):
        pipe, _ = make()
        _attempt(results, name, lambda p=pipe, m=make: _with_cfg(p, lambda: stock_images(m, p)))


def _with_cfg(pipe, fn):
    with cfg_parallel(pipe):
        return fn()


def _rule_checks(results: dict) -> None:
    """Runtime-rule plans applied after the split: refused at the first call (patch), warned about (cfg)."""
    pipe, call = build("dit")

    def run():
        return pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt").images

    def patch_then_plan():
        with patch_parallel(pipe), diffaccel.accelerate(pipe, rule_plan(pipe)):
            return run()

    _attempt(results, "rule-patch", patch_then_plan)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with cfg_parallel(pipe), diffaccel.accelerate(pipe, rule_plan(pipe)):
            run()
    results["rule-cfg-warnings"] = [str(w.message) for w in caught]


def worker(rank: int, out: str) -> None:
    results: dict = {}
    try:
        _split_checks(results)
        _agreement_checks(results, rank, Path(out) / "agree")
        _rule_checks(results)
        for plan in (False, True):
            _attempt(results, f"batch-macs-{plan}",
                     lambda p=plan: mixed_steps_job(ParallelConfig("batch"), Path(out) / f"batch-{p}", p))
    finally:
        torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel-checks")
    os.environ.setdefault("DIFFACCEL_DIST_TIMEOUT", "60")  # a hung exchange fails the test, not the suite
    spawn(worker, 2, (str(out),))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


# -- the tests ---------------------------------------------------------------------------------------------
def test_ranks_agree_on_every_call_argument_the_scheduler_and_the_other_models(ranks):
    """Other prompts had run silently (the record listing rank 0's), another scheduler hung until the timeout."""
    for rank in (0, 1):
        for key, part in (("prompts", "calls"), ("scheduler", "scheduler"), ("vae", "vae")):
            message = ranks[rank][key]
            assert isinstance(message, str) and message.startswith("ParallelError"), message
            assert f"rank 1 disagrees with rank 0 on the {part}:" in message


def test_cfg_parallel_splits_sdxl_time_ids_and_keeps_flux_position_ids(ranks):
    for name, make in (("sdxl", sdxl), ("flux", flux)):
        reference = stock_images(make)
        for rank in (0, 1):
            got = ranks[rank][name]
            assert isinstance(got, torch.Tensor), got
            assert torch.allclose(got, reference, atol=1e-5), (name, float((got - reference).abs().max()))


def test_sdxl_time_ids_have_a_batch_dimension_and_flux_position_ids_do_not():
    ranges = layout(4, 2)[0]
    inputs = {"sample": torch.zeros(4, 4, 2, 2), "added_cond_kwargs": {"time_ids": torch.zeros(4, 6),
                                                                        "text_embeds": torch.zeros(4, 16)},
              "txt_ids": torch.zeros(4, 3), "img_ids": torch.zeros(4, 3)}
    mine = slice_rows(inputs, 4, ranges)
    assert mine["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    assert mine["added_cond_kwargs"]["text_embeds"].shape == (2, 16)
    assert mine["txt_ids"].shape == (4, 3) and mine["img_ids"].shape == (4, 3)  # shared by every row


def test_batch_parallel_counts_calls_of_different_costs_as_one_process(ranks, tmp_path):
    """Rank 0's calls had stood for the job (macs_per_image, baseline, speedup_macs, the plan that ran)."""
    for plan in (False, True):
        record = ranks[0][f"batch-macs-{plan}"]
        assert isinstance(record, dict), record
        single = mixed_steps_job(None, tmp_path / f"single-{plan}", plan)
        assert record["macs_per_image"] == pytest.approx(single["macs_per_image"], rel=1e-4)
        if plan:
            assert record["baseline"]["macs_per_image"] == pytest.approx(single["baseline"]["macs_per_image"],
                                                                         rel=1e-4)
            assert record["speedup_macs"] == pytest.approx(single["speedup_macs"], rel=1e-4)
            # the plan as the last call ran it (mapped to its 6 steps), though rank 1 ran that call
            assert record["plan"] == single["plan"] and record.get("resampled_from") == single.get("resampled_from")


def test_a_call_of_one_seed_is_one_piece_and_the_error_counts_its_images(ranks):
    for rank in (0, 1):
        message = ranks[rank]["one-seed"]
        assert isinstance(message, str) and message.startswith("ParallelError"), message
        assert "2 image(s) split into only 1 piece(s) for 2 ranks" in message, message


def test_runtime_rule_plans_applied_after_the_split_are_refused_or_warned_about(ranks):
    for rank in (0, 1):
        assert ranks[rank]["rule-patch"].startswith("ParallelError") and "static plan" in ranks[rank]["rule-patch"]
        assert sum("runtime-rule plan" in w for w in ranks[rank]["rule-cfg-warnings"]) == 1


def test_patch_parallel_refuses_a_runtime_rule_plan_before_touching_the_model():
    pipe, _ = build("dit")
    processors = [block.attn1.processor for block in pipe.transformer.transformer_blocks]
    with diffaccel.accelerate(pipe, rule_plan(pipe)):
        with pytest.raises(ParallelError, match="static plan"):
            with patch_parallel(pipe):
                pass
    assert [block.attn1.processor for block in pipe.transformer.transformer_blocks] == processors
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks


def test_cfg_parallel_warns_about_a_runtime_rule_plan_applied_first():
    pipe, _ = build("dit")
    wrapper = CFGParallel(pipe.transformer, Group(rank=0, world=2))  # installing exchanges nothing yet
    with diffaccel.accelerate(pipe, rule_plan(pipe)):
        with pytest.warns(UserWarning, match="runtime-rule plan"):
            wrapper.install()
        wrapper.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with diffaccel.accelerate(pipe, methods.fora(pipe.transformer, 6, interval=2)):
            wrapper.install()  # a static plan: nothing to say
            wrapper.remove()


def test_a_quantized_plan_warns_under_batch_parallelism_and_the_cfg_warning_sends_nobody_there(caplog):
    pipe, _ = build("dit")
    plan = methods.fora(pipe.transformer, 6, interval=2).with_quant(QuantSpec(calibration="ranges.safetensors"))
    two = Group(rank=0, world=2)
    with caplog.at_level("WARNING", logger="diffaccel"):
        check_job(ParallelConfig("batch"), two, pipe.transformer, plan)
        check_job(ParallelConfig("cfg"), two, pipe.transformer, plan)
    batch, cfg = (record.getMessage() for record in caplog.records)
    assert "quantized plan under batch parallelism" in batch
    assert "one process whose calls are the ranks' pieces" in batch
    assert "--parallel batch keeps them" not in cfg


def test_a_rank_that_stops_answering_is_told_as_lost_contact(monkeypatch):
    """gloo's timeout had become "check that call's arguments" (cfg) or a traceback (batch)."""
    hung = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 15000ms for recv operation"

    def pipe(**kwargs):
        raise RuntimeError(hung)

    call = Call({"class_labels": [0]}, (0,))
    with pytest.raises(RuntimeError, match="Timed out waiting") as raised:
        call.run(pipe)
    assert not isinstance(raised.value, WorkloadError)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ParallelError, match="lost contact with the other ranks"):
        _rank_tagged(lambda: call.run(pipe))
