"""Parallel sampling over torch.distributed (gloo, 2 CPU processes): CFG parallelism reproduces the
single-process images (also under a caching plan, on the embedded and on stock diffusers pipelines);
batch parallelism gives the same images and record; patch parallelism runs, is exact with every step
synchronous and measurably stale otherwise; and the clear errors.

The two-process work runs once (``torch.multiprocessing.spawn`` through ``diffaccel.parallel.spawn``)
and each rank writes what it saw to a file; the tests below read and judge it. One test launches the
command line through torchrun, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import diffaccel
from conftest import requires_weights, run_cli
from diffaccel import methods
from diffaccel.adapters import find_denoiser
from diffaccel.eval.fidelity import psnr_per_image
from diffaccel.generate import GenerateConfig, run_generate
from diffaccel.parallel import ParallelError, cfg_parallel, check_agreement, current, patch_parallel, shm, spawn
from diffaccel.parallel.cfg import layout, reassemble, slice_rows
from diffaccel.parallel.exchange import gather_cat
from diffaccel.parallel.job import ParallelConfig, check_job
from diffaccel.parallel.shard import assemble, shard
from diffaccel.parallel.shm import exchange_for, usable
from diffaccel.targets import Target, load_target
from diffaccel.zoo.weights import load_pipeline
from stock_pipelines import build as build_case

pytestmark = requires_weights
STEPS = 8
STOCK = ("sd-ddim-eta", "pixart-alpha", "dit", "user-pipeline")
TIMING = {"seconds", "speedup_wall", "wall_pairs", "threads", "parallel"}
ROOT = Path(__file__).resolve().parent.parent


def figures(record: dict) -> dict:
    """A record without its timing fields (wall-clock seconds, speedups, thread count, the parallel setting)."""
    out = {k: v for k, v in record.items() if k not in TIMING}
    if "baseline" in out:
        out["baseline"] = {k: v for k, v in out["baseline"].items() if k != "seconds"}
    return out


def same_figures(got: dict, want: dict, exact: bool) -> None:
    """Equal records: integers, strings and structure exactly; floats exactly, or (``exact`` False:
    images computed in another reduction order) to 1e-4 relative."""
    assert type(got) is type(want) or {type(got), type(want)} <= {int, float}, (got, want)
    if isinstance(want, dict):
        assert set(got) == set(want), set(got) ^ set(want)
        for key in want:
            same_figures(got[key], want[key], exact)
    elif isinstance(want, list):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            same_figures(a, b, exact)
    elif isinstance(want, float) and not exact:
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    else:
        assert got == want


def embedded_run(pipe, labels=(0, 1, 2, 3), guidance=3.0, steps=STEPS) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(labels))]
    return pipe(list(labels), num_inference_steps=steps, guidance_scale=guidance, generator=gens).images


def stock_run(name: str, pipe=None) -> torch.Tensor:
    built, call = build_case(name)
    pipe = pipe or built
    return pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pt").images


def fora(pipe, steps=STEPS):
    return methods.fora(pipe.denoiser, steps, interval=2)


def small_job(parallel: ParallelConfig | None, out: Path) -> dict | None:
    target = load_target("dit")
    cfg = GenerateConfig(classes=["circle", "square", "triangle"], per_class=3, steps=STEPS, batch_size=4)
    return run_generate(target, cfg, out, plan=fora(target.pipe), compare=True, progress=False, parallel=parallel)


def stock_sd_job(parallel: ParallelConfig | None, out: Path) -> dict | None:
    """A stock SD pipeline (text encoder and VAE around the U-Net) under a caching plan, compared."""
    pipe, call = build_case("sd-ddim-eta")
    prompts = [{**call, "prompt": prompt} for prompt in call["prompt"]]
    cfg = GenerateConfig(per_class=1, steps=call["num_inference_steps"])
    plan = methods.fora(find_denoiser(pipe)[0], cfg.steps, interval=2)
    return run_generate(Target("sd-stock", pipe, prompts), cfg, out, plan=plan, compare=True, progress=False,
                        parallel=parallel)


# -- what each rank does ----------------------------------------------------------------------------------
def _attempt(results: dict, key: str, fn) -> None:
    try:
        results[key] = fn()
    except ParallelError as exc:
        results[key] = f"ParallelError: {exc}"
    except Exception:  # recorded, so the test shows it
        results[key] = f"failed: {traceback.format_exc()[-1500:]}"


def _cfg_checks(results: dict) -> None:
    for name in ("dit", "unet"):
        pipe = load_pipeline(name)
        _attempt(results, f"cfg-{name}", lambda p=pipe: _with_cfg(p, embedded_run))
        with diffaccel.accelerate(pipe, fora(pipe)), cfg_parallel(pipe):  # plan first, split second
            results[f"cfg-plan-{name}"] = embedded_run(pipe)
        with cfg_parallel(pipe), diffaccel.accelerate(pipe, fora(pipe)) as run:  # and the other order
            results[f"cfg-plan2-{name}"] = embedded_run(pipe)
        results[f"cfg-plan-macs-{name}"] = run.stats.macs
    for name in STOCK:
        pipe, _ = build_case(name)
        _attempt(results, f"cfg-stock-{name}", lambda p=pipe, n=name: _with_cfg(p, lambda q: stock_run(n, q)))


def _with_cfg(pipe, fn):
    with cfg_parallel(pipe):
        return fn(pipe)


def _patch_checks(results: dict) -> None:
    pipe = load_pipeline("dit")
    for warmup in (STEPS, 1):
        with patch_parallel(pipe, warmup_steps=warmup):
            results[f"patch-dit-{warmup}"] = embedded_run(pipe)
    with diffaccel.accelerate(pipe, fora(pipe)), patch_parallel(pipe, warmup_steps=2):
        results["patch-plan-dit"] = embedded_run(pipe)
    for name in ("pixart-alpha", "dit"):
        stock, _ = build_case(name)
        for warmup in (100, 1):
            _attempt(results, f"patch-stock-{name}-{warmup}",
                     lambda p=stock, n=name, w=warmup: _with_patch(p, w, lambda q: stock_run(n, q)))


def _with_patch(pipe, warmup, fn):
    with patch_parallel(pipe, warmup_steps=warmup):
        return fn(pipe)


def _error_checks(results: dict, rank: int) -> None:
    unet, dit = load_pipeline("unet"), load_pipeline("dit")
    _attempt(results, "err-patch-unet", lambda: _with_patch(unet, 1, embedded_run))
    rule = methods.first_block_cache(dit.denoiser, threshold=0.1)
    _attempt(results, "err-patch-rule", lambda: check_job(ParallelConfig("patch"), current(), dit.denoiser, rule))
    _attempt(results, "err-no-mode", lambda: check_job(None, current(), dit.denoiser, None))
    _attempt(results, "err-one-row", lambda: _with_cfg(dit, lambda p: embedded_run(p, labels=(1,), guidance=1.0)))
    plan = methods.fora(dit.denoiser, STEPS, interval=2 + rank)  # rank 1 holds another plan
    _attempt(results, "err-plan", lambda: check_agreement(current(), dit.denoiser, plan))
    if rank == 1:
        with torch.no_grad():
            dit.denoiser.proj_out_2.bias.add_(1e-3)  # rank 1 holds other weights
    _attempt(results, "err-weights", lambda: check_agreement(current(), dit.denoiser, fora(dit)))


def _batch_checks(results: dict, out: Path) -> None:
    pipe = load_pipeline("dit")
    calls = list(pipe.workload_calls(STEPS, per_class=3, classes=[0, 1, 2], batch_size=4, calibration=False).calls)
    pieces = shard(calls, current())
    images = [pipe(**p.call.kwargs, generator=p.call.generators()).images for p in pieces]
    merged = assemble(pieces, images, current(), len(calls))
    results["batch-pieces"] = [(p.index, p.start, p.stop) for p in pieces]
    if merged is not None:
        results["batch-images"] = torch.cat(merged)
    for mode in ("batch", "cfg"):
        _attempt(results, f"job-{mode}", lambda m=mode: small_job(ParallelConfig(m), out / m))
    _attempt(results, "job-cfg-sd", lambda: stock_sd_job(ParallelConfig("cfg"), out / "cfg-sd"))


def _exchange_checks(results: dict, rank: int) -> None:
    """Gathers through shared memory against gloo's: uneven pieces, a piece that grows the segment, bools."""
    group = current()
    pieces = [torch.arange(5 + rank, dtype=torch.float32).repeat(3, 1).T * (rank + 1),
              torch.full((1 << 19, 2 - rank), float(rank)), torch.tensor([[rank == 0, True]])]
    sizes = [[5, 6], [2, 1], [1, 1]]
    dims = [0, 1, 0]
    results["shm-used"] = exchange_for(group, 64) is not None
    results["shm"] = [gather_cat(p, z, d, group) for p, z, d in zip(pieces, sizes, dims)]
    os.environ["DIFFACCEL_DIST_SHM"] = "0"
    try:
        results["gloo"] = [gather_cat(p, z, d, group) for p, z, d in zip(pieces, sizes, dims)]
    finally:
        del os.environ["DIFFACCEL_DIST_SHM"]
    exchange = exchange_for(group, 64)  # None if the grown segment found no room (a tiny /dev/shm)
    results["shm-grown"] = exchange is not None
    if exchange is not None:  # a rank that never comes: an error after the timeout, not a hang
        if rank == 0:
            exchange.timeout_s = 1.0
            _attempt(results, "shm-timeout", lambda: gather_cat(pieces[0][:5], [5, 5], 0, group))
        else:
            time.sleep(3)
            gather_cat(pieces[0][:5], [5, 5], 0, group)  # late: catches up, the ranks agree again
        dist.barrier()


def _full_shm_check(results: dict, rank: int) -> None:
    """A segment that finds no room (rank 0 cannot reserve it) leaves every rank on gloo: run last."""
    def no_room(*_):
        raise OSError(28, "No space left on device")

    piece = torch.full((1 << 21,), float(rank))  # larger than the segment so far: it must grow
    saved = shm.os.posix_fallocate
    shm.os.posix_fallocate = no_room if rank == 0 else saved
    try:
        results["shm-full"] = gather_cat(piece, [1 << 21] * 2, 0, current())
        results["shm-full-exchange"] = exchange_for(current(), 8 << 21)
    finally:
        shm.os.posix_fallocate = saved


def worker(rank: int, out: str) -> None:
    results: dict = {}
    try:
        _exchange_checks(results, rank)
        _cfg_checks(results)
        _patch_checks(results)
        _error_checks(results, rank)
        _batch_checks(results, Path(out))
        _full_shm_check(results, rank)
    finally:
        torch.save(results, Path(out) / f"rank{rank}.pt")


# -- the tests ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    os.environ.setdefault("DIFFACCEL_DIST_TIMEOUT", "120")  # a hung exchange fails the test, not the suite
    spawn(worker, 2, (str(out),))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], out


def close_enough(out, ref) -> tuple[bool, float]:
    """Bitwise equal, or at least 60 dB PSNR (for kernels that reduce a half batch in another order)."""
    assert isinstance(out, torch.Tensor), out
    psnr = float(psnr_per_image(out.clamp(0, 1), ref.clamp(0, 1)).min())
    return torch.equal(out, ref) or psnr >= 60, psnr


@pytest.mark.parametrize("name", ["dit", "unet"])
def test_cfg_parallel_equals_the_single_process_output(ranks, name):
    results, _ = ranks
    pipe = load_pipeline(name)
    reference = embedded_run(pipe)
    with diffaccel.accelerate(pipe, fora(pipe)) as run:
        planned = embedded_run(pipe)
    for rank in (0, 1):  # every rank holds the whole output
        assert close_enough(results[rank][f"cfg-{name}"], reference)[0]
        assert close_enough(results[rank][f"cfg-plan-{name}"], planned)[0]
        assert close_enough(results[rank][f"cfg-plan2-{name}"], planned)[0]
    assert not torch.equal(planned, reference)  # the plan did change the images
    # each rank's executor counted its half of the work
    assert results[0][f"cfg-plan-macs-{name}"] + results[1][f"cfg-plan-macs-{name}"] == run.stats.macs


@pytest.mark.parametrize("name", STOCK)
def test_cfg_parallel_on_stock_pipelines(ranks, name):
    results, _ = ranks
    ok, psnr = close_enough(results[0][f"cfg-stock-{name}"], stock_run(name))
    assert ok, f"{name}: {psnr:.1f} dB"


def test_patch_parallel_runs_exact_when_synchronous_and_stale_otherwise(ranks, record_property):
    results, _ = ranks
    pipe = load_pipeline("dit")
    reference = embedded_run(pipe)
    exact_ok, exact = close_enough(results[0][f"patch-dit-{STEPS}"], reference)
    stale = results[0]["patch-dit-1"]
    stale_psnr = float(psnr_per_image(stale, reference).mean())
    record_property("patch_psnr_warmup_all", exact)
    record_property("patch_psnr_warmup_1", stale_psnr)
    print(f"patch parallel vs single process, {STEPS} steps: every step synchronous {exact:.1f} dB, "
          f"warm-up 1 (stale keys/values) {stale_psnr:.1f} dB")
    assert exact_ok  # with every step synchronous the bands see exactly what one process sees
    assert torch.isfinite(stale).all() and stale.shape == reference.shape
    assert not torch.equal(stale, reference)  # stale activations really were used
    assert torch.equal(results[0]["patch-dit-1"], results[1]["patch-dit-1"])  # ranks agree on the output
    assert torch.isfinite(results[0]["patch-plan-dit"]).all()
    for name in ("pixart-alpha", "dit"):
        exact_ok, psnr = close_enough(results[0][f"patch-stock-{name}-100"], stock_run(name))
        assert exact_ok, f"{name}: {psnr:.1f} dB"
        assert torch.isfinite(results[0][f"patch-stock-{name}-1"]).all()


def test_stale_keys_serve_only_the_token_bands_they_were_gathered_for(monkeypatch):
    """A bottleneck stage changes the bands' token counts: the first exchange at the new size is
    synchronous, so no band attends to keys of another resolution."""
    from diffaccel.parallel import patch as patch_module

    calls = []

    def gather(kv, sizes, dim, group, async_op=True):
        calls.append((list(sizes), async_op))
        return patch_module.Pending([kv], list(sizes), dim)

    monkeypatch.setattr(patch_module, "start_gather", gather)
    owner = types.SimpleNamespace(branch=0, sync=False, token_sizes=[16], group=types.SimpleNamespace(rank=0))
    attention = patch_module.StaleSelfAttention(owner)
    for tokens in (16, 16, 4, 4, 16):
        owner.token_sizes = [tokens]
        assert attention._keys_values(torch.ones(2, tokens, 8)).shape == (2, tokens, 8)
    # the first call and each change of size gather synchronously, the repeats start a stale exchange
    assert [sync for _, sync in calls] == [False, True, False, True, False]


def test_shared_memory_gathers_equal_gloo_and_time_out(ranks):
    results, _ = ranks
    assert results[0]["shm-used"] == usable(current().__class__(0, 2))  # used wherever it may be
    for rank in (0, 1):
        for shared, gloo in zip(results[rank]["shm"], results[rank]["gloo"]):
            assert shared.dtype == gloo.dtype and torch.equal(shared, gloo)
        assert results[rank]["shm"][0].shape == (11, 3) and results[rank]["shm"][1].shape == (1 << 19, 3)
    for rank in (0, 1):  # no room for a segment: gloo, the same result
        assert torch.equal(results[rank]["shm-full"], torch.cat([torch.zeros(1 << 21), torch.ones(1 << 21)]))
        assert results[rank]["shm-full-exchange"] is None
    if results[0]["shm-grown"]:  # the case everywhere but in a tiny /dev/shm (here: always)
        assert results[0]["shm-timeout"].startswith("ParallelError") and "rank 1 did not" in results[0]["shm-timeout"]


@pytest.mark.parametrize("batch,world", [(72, 2), (10, 3), (7, 2), (2, 2), (4, 4), (3, 3)])
def test_each_rank_takes_a_share_of_both_guidance_halves(batch, world):
    ranks = layout(batch, world)
    rows = torch.arange(batch)
    pieces = [slice_rows(rows, batch, mine) for mine in ranks]
    assert all(len(p) for p in pieces) and torch.equal(reassemble(pieces, ranks), rows)
    if batch % 2 == 0 and batch // 2 >= world:  # every rank holds unconditional and conditional rows
        assert all((p < batch // 2).any() and (p >= batch // 2).any() for p in pieces)


def test_clear_errors(ranks):
    results, _ = ranks
    for rank in (0, 1):
        r = results[rank]
        assert r["err-patch-unet"].startswith("ParallelError") and "U-Net" in r["err-patch-unet"]
        assert r["err-patch-rule"].startswith("ParallelError") and "static plan" in r["err-patch-rule"]
        assert r["err-no-mode"].startswith("ParallelError") and "--parallel" in r["err-no-mode"]
        assert r["err-one-row"].startswith("ParallelError") and "cannot be split" in r["err-one-row"]
        assert r["err-plan"].startswith("ParallelError") and "rank 1 disagrees" in r["err-plan"] \
            and "plan" in r["err-plan"]
        assert r["err-weights"].startswith("ParallelError") and "weights" in r["err-weights"]


def test_batch_parallel_gives_the_same_images_and_record(ranks, tmp_path):
    results, out = ranks
    pipe = load_pipeline("dit")
    calls = pipe.workload_calls(STEPS, per_class=3, classes=[0, 1, 2], batch_size=4, calibration=False)
    reference = torch.cat([pipe(**c.kwargs, generator=c.generators()).images for c in calls.calls])
    # a call's rows are split between the ranks: bitwise where the kernels give a smaller batch the same
    # bits (the CPU the figures were measured on), at float rounding on others (e.g. AVX-512/AMX ones)
    same, psnr = close_enough(results[0]["batch-images"], reference)
    assert same, psnr
    assert "batch-images" not in results[1]  # only rank 0 holds the gathered images
    assert results[0]["batch-pieces"] and results[1]["batch-pieces"]  # both ranks had work
    single = small_job(None, tmp_path / "single")
    for mode in ("batch", "cfg"):
        record = results[0][f"job-{mode}"]
        assert isinstance(record, dict), record
        assert results[1][f"job-{mode}"] is None  # rank 0 reports
        assert record["parallel"] == {"mode": mode, "world_size": 2}
        # both split a call's rows, which some CPUs' kernels reduce in another order (the last float bits)
        same_figures(figures(record), figures(single), exact=False)
        assert record["psnr"] < 100 and record["work"]["reused"] > 0  # the figures are a plan's, not trivial
    grids = [np.asarray(Image.open(f / "grid.png"), dtype=np.int16) for f in (out / "batch", tmp_path / "single")]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 1  # 8-bit rounding at most


def test_cfg_parallel_counts_the_text_encoder_and_decoder_once(ranks, tmp_path):
    """On a pipeline with work outside the denoiser the record's MACs are one process's: the ranks'
    shares of the U-Net summed, the text encoder and decoder that every rank runs counted once."""
    results, _ = ranks
    record = results[0]["job-cfg-sd"]
    assert isinstance(record, dict), record
    single = stock_sd_job(None, tmp_path / "single")
    assert single["macs_per_image"] > single["work"]["macs"]  # one image per call: the rest is there to count
    same_figures(figures(record), figures(single), exact=False)


def test_torchrun_command_line(monkeypatch, capsys, tmp_path):
    """``torchrun --nproc-per-node 2 -m diffaccel generate --parallel cfg``: the same record as one
    process; a mode that cannot apply is a rank-tagged one-line error."""
    args = ["generate", "--model", "dit", "--classes", "circle,square", "--per-class", "2", "--steps", "6",
            "--method", "fora", "--interval", "2", "--compare"]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "one")
    assert code == 0, err
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DIFFACCEL_DIST_TIMEOUT": "120"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "diffaccel"]
    proc = subprocess.run([*launch, *args, "--parallel", "cfg", "--out", str(tmp_path / "two")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("speedup") == 1  # one summary, from rank 0
    one, two = (json.loads((tmp_path / d / "record.json").read_text()) for d in ("one", "two"))
    same_figures(figures(two), figures(one), exact=False)
    bad = subprocess.run([*launch, "generate", "--model", "unet", "--classes", "circle", "--per-class", "2",
                          "--steps", "2", "--parallel", "patch", "--out", str(tmp_path / "bad")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    lines = [line for line in bad.stderr.splitlines() if line.startswith("error: [rank")]
    assert {line[:16] for line in lines} == {"error: [rank 0/2", "error: [rank 1/2"}, bad.stderr[-2000:]
    assert all("U-Net" in line for line in lines)


@requires_weights
def test_patch_parallelism_under_a_few_step_plan_warns_that_stale_keys_cost_more(caplog):
    from diffaccel.parallel.group import Group
    from diffaccel.plan import Plan

    plan = Plan.load(Path(__file__).parents[1] / "benchmarks/results/plans/dit-joint-unipc7-fitted-coefficients.json")
    model = load_pipeline("dit").transformer
    two = Group(rank=0, world=2)
    with caplog.at_level("WARNING", logger="diffaccel"):
        check_job(ParallelConfig("patch", warmup_steps=3), two, model, plan)
        assert not caplog.records  # half the 7 steps exact: nothing to say
        check_job(ParallelConfig("patch", warmup_steps=1), two, model, plan)
    assert "7-step sampler" in caplog.text and "--warmup-steps 3" in caplog.text


def test_a_rank_lost_under_gloo_is_told_as_such_not_as_the_calls_fault(monkeypatch):
    """gloo reports a dead peer as a plain RuntimeError: it had become "check that call's arguments" (cfg)
    or a traceback (batch, patch)."""
    from diffaccel.calibration.workload import Call
    from diffaccel.cli.generate import _rank_tagged
    from diffaccel.errors import WorkloadError

    def broken(message):
        def pipe(**kwargs):
            raise RuntimeError(message)
        return pipe

    lost = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500"
    call = Call({"class_labels": [0]}, (0,))
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        call.run(broken(lost))
    with pytest.raises(WorkloadError, match="check that call's arguments"):
        call.run(broken("mat1 and mat2 shapes cannot be multiplied"))
    monkeypatch.setenv("WORLD_SIZE", "2")

    def job():
        call.run(broken(lost))

    def other():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(ParallelError, match=r"\[rank \?\] lost contact with the other ranks"):
        _rank_tagged(job)
    with pytest.raises(RuntimeError, match="mat1"):  # any other RuntimeError is left as it is
        _rank_tagged(other)


@requires_weights
def test_a_quantized_plan_under_cfg_parallelism_warns_that_its_images_differ(caplog):
    from diffaccel.parallel.group import Group
    from diffaccel.quant.spec import QuantSpec

    dit = load_target("dit")
    plan = methods.fora(dit.pipe, 10, interval=2).model_copy(update={"quant": None})
    two = Group(rank=0, world=2)
    with caplog.at_level("WARNING", logger="diffaccel"):
        check_job(ParallelConfig("cfg"), two, dit.denoiser()[0], plan)
        assert not caplog.records
        quantized = plan.with_quant(QuantSpec(calibration="ranges.safetensors"))
        check_job(ParallelConfig("cfg"), two, dit.denoiser()[0], quantized)
    assert "quantized plan under CFG parallelism" in caplog.text
