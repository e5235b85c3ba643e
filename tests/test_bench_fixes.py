"""diffaccel bench and report: peer settings scaled to the run's step count, sweeps and prompt files
checked before any worker starts, workers that end with the bench, fewer-step rows' executor MACs
against the baseline's, and reports of a results file away from (or without) its run folder."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import requires_weights, run_cli
from diffaccel.bench import sweeps
from diffaccel.bench.candidates import fewer_steps
from diffaccel.bench.config import PARENT_ENV, BenchConfig, check_config
from diffaccel.bench.peers import PEERS, Context
from diffaccel.calibration.workload import Call
from diffaccel.errors import BenchError, SweepError

COMMITTED = Path(__file__).parents[1] / "benchmarks" / "results"


def _step_counted(settings: list[dict]) -> list[int]:
    return [one[knob] for one in settings for knob in ("cache_keys", "gate_step") if knob in one]


def test_peer_step_counted_settings_follow_the_run_s_step_count():
    """torchao's and quanto's cache_keys and T-GATE's gate_step are written for 50 steps: at 10 steps 14
    keys had been skipped, 10 keys had been a no-cache duplicate and gate steps past the run never gated."""
    for model in ("dit", "unet"):
        for steps in (4, 10, 20):
            sweep = sweeps.default_sweep(model, steps=steps)
            for name in ("torchao", "quanto", "tgate"):
                if name not in sweep:
                    continue
                values = _step_counted(sweep[name])
                assert values and all(1 <= v < steps for v in values), (model, steps, name, values)
                assert all(one not in sweep[name][:i] for i, one in enumerate(sweep[name])), (model, steps, name)
        at_50 = sweeps.default_sweep(model)  # the documented 50-step defaults stay as written
        kind = sweeps.PEER_SWEEPS[model]
        assert all(at_50[name] == kind[name] for name in ("torchao", "quanto", "tgate") if name in kind)


def test_integer_settings_refuse_fractions_and_take_whole_floats():
    with pytest.raises(SweepError, match=r"steps-ddim's steps is a whole number \(default 20\), got 2.5"):
        sweeps.validate({"steps-ddim": [{"steps": 2.5}]}, "dit")  # had run 2 steps under the label steps=2.5
    with pytest.raises(SweepError, match="torchao's cache_keys is a whole number"):
        sweeps.validate({"torchao": [{"cache_keys": 2.5}]}, "dit")
    with pytest.raises(SweepError, match="fora's interval is a number"):
        sweeps.validate({"fora": [{"interval": float("nan")}]}, "dit")
    with pytest.raises(SweepError, match="fora's interval is a number .*got null"):
        sweeps.validate({"fora": [{"interval": None}]}, "dit")  # had passed, to fail when the row ran
    kept = sweeps.validate({"fora": [{"interval": 2.0}], "torchao": [{"cache_keys": None}]}, "dit")
    assert kept["fora"] == [{"interval": 2}] and type(kept["fora"][0]["interval"]) is int
    assert kept["torchao"] == [{"cache_keys": None}]


def test_an_unknown_name_suggests_only_names_that_apply_to_the_model():
    for model in ("sd3", "flux", "dit", "unet"):
        with pytest.raises(SweepError) as caught:
            sweeps.validate({"nosuch": [{}]}, model)
        offered = str(caught.value).split("choose from ")[1].split(", ")
        assert "plan" in offered and "steps-ddim" in offered
        assert [n for n in offered if n != "plan" and not sweeps.applies_to(n, model)] == [], (model, offered)
    assert "diffusers-fbc" not in str(caught.value) and "deepcache" in str(caught.value)  # the U-Net's


@pytest.mark.parametrize("sweep, fragment", [
    ({"diffusers-taylorseer": [{"interval": 0}]}, "diffusers-taylorseer's interval must be a number >= 1, got 0"),
    ({"diffusers-pab": [{"skip_range": 0}]}, "diffusers-pab's skip_range must be a number >= 1, got 0"),
    ({"diffusers-pab": [{"timestep_range": [100]}]}, "timestep_range must be two timesteps [first, last]"),
    ({"diffusers-fastercache": [{"timestep_range": [600, 100]}]}, "with first < last"),
    ({"diffusers-taylorseer": [{"factors_dtype": "bfloat17"}]}, "factors_dtype must name a torch dtype"),
    ({"torchao": [{"config": "int4"}]}, "torchao's config must be one of int8-weight-only, int8-dynamic"),
    ({"quanto": [{"cache_keys": 0}]}, "quanto's cache_keys must be a number >= 1"),
])
def test_out_of_range_peer_settings_are_refused_with_what_to_change(sweep, fragment):
    """They had reached the peer and been skipped as ZeroDivisionError or IndexError."""
    with pytest.raises(SweepError) as caught:
        sweeps.validate(sweep, "dit")
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_fastercache_without_guidance_is_refused_like_tgate():
    def no_pipeline():
        raise AssertionError("the guidance is checked before a pipeline loads")

    ctx = Context(model="dit", sampler="ddim", steps=4, guidance=1.0, fresh_pipe=no_pipeline, calib_calls=[])
    with pytest.raises(ValueError, match="FasterCache skips the unconditional half .* it needs guidance > 1"):
        PEERS["diffusers-fastercache"].open(ctx, {"skip_range": 2})  # had failed with an IndexError


@pytest.mark.parametrize("lines, fragment", [
    (['{"prompt": "a red circle"}', "", "# zero", '{"prompt": "a blue square", "num_images_per_prompt": 0}'],
     "line 4: num_images_per_prompt must be a whole number >= 1, got 0"),
    (['{"prompt": []}'], 'line 1: "prompt" is an empty list'),
])
def test_a_prompt_line_of_no_images_is_refused_before_any_worker(tmp_path, lines, fragment):
    """It had run every group and failed them all with torch's reshape error."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    with pytest.raises(BenchError) as caught:
        check_config(BenchConfig(pipeline=str(tmp_path / "folder"), prompts=str(prompts)))
    assert fragment in str(caught.value)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_for(path: Path, seconds: float) -> int:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if path.is_file() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.2)
    raise AssertionError(f"{path} was not written in {seconds} s")


def _kill(pid: int | None) -> None:
    if pid is not None and _alive(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_sigterm_to_the_bench_ends_its_worker(tmp_path):
    """``kill``, ``timeout`` or a job scheduler's SIGTERM had ended the bench alone, its worker left
    running (here a stand-in worker that sleeps)."""
    fake = tmp_path / "fake-python"
    fake.write_text('#!/bin/sh\necho $$ > "$FAKE_WORKER_PID"\nexec sleep 120\n')
    fake.chmod(0o755)
    script = textwrap.dedent(f"""
        import types
        from pathlib import Path
        from diffaccel.bench import BenchConfig, runner
        runner.sys = types.SimpleNamespace(executable={str(fake)!r})
        cfg = BenchConfig(model="dit", per_class=1, classes=["circle"], steps=4, batch_size=1,
                          sweep={{"steps-ddim": [{{"steps": 2}}]}})
        runner.run_bench(cfg, Path({str(tmp_path / "out")!r}), progress=False)
    """)
    pid_file = tmp_path / "worker.pid"
    env = {**os.environ, "FAKE_WORKER_PID": str(pid_file)}
    bench = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = _wait_for(pid_file, 120)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(60) == 128 + signal.SIGTERM
        time.sleep(0.5)
        assert not _alive(worker), "the worker outlived the bench"
    finally:
        bench.kill()
        _kill(worker)


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_worker_dies_with_a_bench_killed_outright(tmp_path):
    """Even SIGKILL, which no handler sees, ends the worker (it asks Linux for its parent's death)."""
    pid_file = tmp_path / "worker.pid"
    worker_code = ("import os, sys, time; from diffaccel.bench.config import die_with_parent; die_with_parent(); "
                   "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)")
    parent_code = ("import os, subprocess, sys, time; "
                   f"subprocess.Popen([sys.executable, '-c', {worker_code!r}, {str(pid_file)!r}], "
                   f"env={{**os.environ, {PARENT_ENV!r}: str(os.getpid())}}); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    worker = None
    try:
        worker = _wait_for(pid_file, 120)
        parent.kill()
        parent.wait(30)
        deadline = time.time() + 30
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "the worker outlived its killed parent"
    finally:
        parent.kill()
        _kill(worker)


@requires_weights
def test_a_fewer_step_row_counts_the_executor_s_macs_against_the_baseline_s():
    """Half the steps is half the MACs by the executor's count too (it had compared the plan with its own
    step count: 1.0 on every fewer-step row)."""
    from diffaccel.bench.worker import _warm_up
    from diffaccel.zoo.weights import load_pipeline

    torch.set_num_threads(1)
    call = Call({"class_labels": [0], "num_inference_steps": 4, "guidance_scale": 3.0}, (1,))
    ctx = Context(model="dit", sampler="ddim", steps=4, guidance=3.0,
                  fresh_pipe=lambda sampler=None: load_pipeline("dit", "ddim", None), calib_calls=[call])
    images, forwards = _warm_up(ctx.fresh_pipe(), call)
    assert (images, forwards) == (1, 4)  # one batched (guided) forward per step
    for shared in ({}, {"base_forwards": forwards}):
        ctx.shared = shared
        candidate = fewer_steps(ctx, "steps-ddim", {"steps": 2})
        candidate.run(call)
        assert candidate.extra()["speedup_macs_executor"] == pytest.approx(2.0)


def _committed(model: str, folder: Path) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(COMMITTED / f"bench-{model}" / "results.json", folder / "results.json")
    return folder / "results.json"


def test_report_into_another_run_s_folder_is_refused_and_elsewhere_writes_all_three(tmp_path, monkeypatch, capsys):
    """``report A/results.json --out B`` had left B's results.json (one run) beside tables of another."""
    dit = _committed("dit", tmp_path / "dit")
    unet = _committed("unet", tmp_path / "unet")
    before = unet.read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, "report", dit, "--out", unet.parent)
    assert code != 0 and "holds the results of another run (unet" in err and len(err.strip().splitlines()) == 1
    assert unet.read_bytes() == before and not (unet.parent / "results.md").exists()
    fresh = tmp_path / "fresh"
    for _ in range(2):  # the second time, fresh holds this run's own results: replaced
        code, _, err = run_cli(monkeypatch, capsys, "report", dit, "--out", fresh)
        assert code == 0, err
    written = json.loads((fresh / "results.json").read_text())
    assert written["model"] == "dit" and (fresh / "results.md").read_text().startswith("# diffaccel bench: dit")
    assert (fresh / "report.html").is_file()


def test_report_without_the_run_folder_writes_the_tables_and_a_page_without_grids(tmp_path, monkeypatch, capsys):
    """The committed results keep no run folder: the documented ``report results.json --tail 25 --out
    DIR`` had written nothing ("sample grid ... is missing")."""
    saved = _committed("unet", tmp_path / "saved")
    out = tmp_path / "tail"
    code, _, err = run_cli(monkeypatch, capsys, "report", saved, "--tail", "25", "--out", out)
    assert code == 0, err
    assert "report.html is written without it" in err and "baseline" in err
    assert json.loads((out / "results.json").read_text())["psnr_p5_floor"] == 25
    assert "5th pct >= 25 dB" in (out / "results.md").read_text()
    page = (out / "report.html").read_text()
    assert "Left out: the sample grid of the baseline" in page and page.count("data:image/png;base64,") == 2
    code, _, err = run_cli(monkeypatch, capsys, "report", saved)  # beside the results file too
    assert code == 0 and (saved.parent / "report.html").is_file() and (saved.parent / "results.md").is_file()
    # in place, an existing page (the committed ones embed their grids) is kept, not replaced by one without
    (saved.parent / "report.html").write_text("the page with its grids")
    code, stdout, err = run_cli(monkeypatch, capsys, "report", saved)
    assert code == 0 and "is kept; only results.md is rewritten" in err and "report.html" not in stdout
    assert (saved.parent / "report.html").read_text() == "the page with its grids"


@requires_weights
def test_closing_a_diffusers_hook_peer_gives_the_transformer_back_as_it_came():
    from diffaccel.zoo.weights import load_pipeline

    torch.set_num_threads(1)
    pipes = []
    call = Call({"class_labels": [0], "num_inference_steps": 3, "guidance_scale": 3.0}, (1,))
    ctx = Context(model="dit", sampler="ddim", steps=3, guidance=3.0, calib_calls=[call],
                  fresh_pipe=lambda sampler=None: pipes.append(load_pipeline("dit", "ddim", None)) or pipes[-1])
    candidate = PEERS["diffusers-fbc"].open(ctx, {"threshold": 0.5})
    model = Context.denoiser(pipes[0])
    hooked = candidate.run(call)
    candidate.close()
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks for m in model.modules())
    plain = Context.sample(load_pipeline("dit", "ddim", None), call)
    assert torch.equal(Context.sample(pipes[0], call), plain) and not torch.equal(hooked, plain)
