"""diffaccel bench and diffaccel report: a tiny run end to end (workers in subprocesses, a missing
peer reported as skipped), the peers at tiny size in-process, the HTML in headless Chromium, and
bad input as one-line errors that never replace a good report."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffaccel
from conftest import requires_weights, run_cli
from diffaccel.adapters import adapter_by_name
from diffaccel.bench import peers as peer_registry
from diffaccel.bench import sweeps
from diffaccel.bench.config import BenchConfig, BenchJob, check_config, items
from diffaccel.bench.report import markdown
from diffaccel.bench.results import FORMAT_VERSION, load_results, summarize
from diffaccel.bench.runner import group_units, plan_groups
from diffaccel.cli import main
from diffaccel.errors import BenchError, SweepError
from diffaccel.eval import allocator
from diffaccel.eval.paired import paired_change
from diffaccel.methods.registry import METHODS
from diffaccel.targets import load_target

pytestmark = requires_weights

CHROMIUM = Path("/usr/bin/chromium")
TINY_SWEEP = {
    "fora": [{"interval": 2}],
    "diffusers-fbc": [{"threshold": 0.2}],
    "cachedit-dbcache": [{"threshold": 0.3, "warmup": 1}],
    "cachedit-dbcache-taylorseer": [{"threshold": 0.2}],  # made to look uninstalled below
    "steps-ddim": [{"steps": 2}],
}
TINY_ARGS = ["--per-class", "1", "--classes", "circle,square", "--batch-size", "1", "--steps", "4", "--threads", "1"]


invoke = run_cli


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny DiT bench through the real entry point: 2 images, 4 steps, one setting per name."""
    root = tmp_path_factory.mktemp("bench")
    sweep = root / "sweep.json"
    sweep.write_text(json.dumps(TINY_SWEEP))
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(peer_registry.PEERS["cachedit-dbcache-taylorseer"], "package", "cache_dit_not_installed_here")
        mp.setattr(sys, "argv", ["diffaccel", "bench", "--model", "dit", "--sweep", str(sweep), "--out", str(out),
                                 *TINY_ARGS])
        try:
            main()
        except SystemExit as exc:
            assert not exc.code, f"bench exited with {exc.code}"
    return out


def test_tiny_bench_writes_results_markdown_and_report(tiny_run):
    results = load_results(tiny_run / "results.json")
    data = json.loads((tiny_run / "results.json").read_text())
    assert data["format_version"] == FORMAT_VERSION
    for key in ("machine", "versions", "threads", "samples", "rows", "skipped", "summary"):
        assert key in data
    assert data["threads"] == 1 and data["samples"]["n_images"] == 2 and data["samples"]["fd_samples"] == 2
    # the workers time in the allocator's steady state (freed memory kept) wherever glibc allows it
    assert data["baseline"]["allocator"] == ("kept" if allocator._glibc() else "system")
    assert "fewer than the 600" in data["samples"]["note"]
    assert {r.family for r in results.rows} == {"diffaccel", "peer", "steps"}
    names = {r.name for r in results.rows}
    assert {"fora", "diffusers-fbc", "steps-ddim"} <= names
    for row in data["rows"]:
        for key in ("family", "name", "setting", "speedup_macs", "speedup_wall", "peak_mem_mb", "psnr", "ssim",
                    "accuracy", "fd"):
            assert key in row, key
        assert row["speedup_wall"] > 0 and row["peak_mem_mb"] > 0 and 0 <= row["accuracy"] <= 1
        assert (tiny_run / row["grid"]).is_file()
        # the accuracy's change from the baseline's images of the same seeds, paired image by image
        paired = row["paired"]["accuracy"]
        assert paired["change"] == pytest.approx(row["accuracy"] - data["baseline"]["accuracy"], abs=1e-6)
        assert 0 <= paired["flips"] <= 2 and paired["low"] <= paired["change"] <= paired["high"]
    fora = next(r for r in results.rows if r.name == "fora")
    assert fora.speedup_macs > 1.5  # reusing every other step's residuals runs fewer MACs
    steps = next(r for r in results.rows if r.name == "steps-ddim")
    assert steps.speedup_macs == pytest.approx(2.0, rel=0.01)
    # a peer that is not installed is reported with the reason, never silently dropped
    missing = [s for s in results.skipped if s.name == "cachedit-dbcache-taylorseer"]
    assert missing and "not installed" in missing[0].reason and "diffaccel[peers]" in missing[0].reason
    assert set(results.summary) == set(TINY_SWEEP)
    assert results.summary["cachedit-dbcache-taylorseer"].speedup_wall is None
    table = (tiny_run / "results.md").read_text()
    assert f"{fora.accuracy:.1%} ({fora.paired['accuracy'].change * 100:+.1f} pt, " in table
    assert "Speedup at PSNR >= 30 dB" in table and "| fora |" in table and "not installed" in table
    best = [b for b in results.summary.values() if b.speedup_wall is not None]
    assert best and all(b.psnr_p5 <= b.psnr and f"dB (5th pct {b.psnr_p5:.1f})" in table for b in best)
    page = (tiny_run / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4  # two plots, the baseline grid, ours (and the peer's)
    assert "src='http" not in page and 'src="http' not in page  # self-contained


def test_a_paired_change_counts_the_flips_and_its_interval_brackets_it():
    base = torch.tensor([True] * 8 + [False] * 2)
    hits = base.clone()
    hits[:2] = False  # two right -> wrong
    hits[8] = True  # one wrong -> right
    change = paired_change(hits, base)
    assert change["change"] == pytest.approx(-0.1) and change["flips"] == 3
    diffs = (hits.double() - base.double())
    half = 1.96 * float(diffs.std()) / 10 ** 0.5
    assert change["low"] == pytest.approx(-0.1 - half) and change["high"] == pytest.approx(-0.1 + half)
    assert change["se"] == pytest.approx(half / 1.96)
    same = paired_change(base, base)  # no flip on 10 images is no certainty: the rule of three
    assert same == {"change": 0.0, "low": -0.3, "high": 0.3, "se": 0.0, "flips": 0}
    worst = paired_change(torch.tensor([False] * 3 + [True]), torch.tensor([True] * 4))
    assert worst["low"] == -1.0 and worst["high"] <= 1.0  # had read -124 points
    assert paired_change(hits[:1], base[:1])["low"] is None  # one image: no interval
    with pytest.raises(ValueError, match="as many images"):
        paired_change(hits, base[:5])


def test_later_groups_reuse_the_first_groups_baseline_images(tiny_run):
    run_dir = next(tiny_run.glob("run-*"))
    assert (run_dir / "baseline.safetensors").is_file()
    results = {p.name: json.loads(p.read_text()) for p in (run_dir / "jobs").glob("*.result.json")}
    first = results.pop("fora.result.json")["baseline"]
    assert first["from_cache"] is False
    assert results and all(r["baseline"]["from_cache"] and r["baseline"]["matches_cache"] for r in results.values())
    assert {r["baseline"]["sha256"] for r in results.values()} == {first["sha256"]}


def test_resume_reruns_only_the_unfinished_groups(tiny_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(tiny_run, out)
    run_dir = next(out.glob("run-*"))
    (run_dir / "jobs" / "steps.result.json").unlink()  # as if killed during the last group
    (out / "results.json").unlink()
    kept = (run_dir / "jobs" / "fora.result.json").read_text()
    monkeypatch.setattr(peer_registry.PEERS["cachedit-dbcache-taylorseer"], "package", "cache_dit_not_installed_here")
    sweep = tiny_run.parent / "sweep.json"
    code, _, err = invoke(monkeypatch, capsys, "bench", "--model", "dit", "--sweep", str(sweep), "--out", str(out),
                          "--resume", *TINY_ARGS)
    assert code == 0, err
    assert f"resuming {run_dir}" in err and "fora: read back" in err and "steps: read back" not in err
    assert (run_dir / "jobs" / "fora.result.json").read_text() == kept
    assert (run_dir / "jobs" / "steps.result.json").is_file() and len(list(out.glob("run-*"))) == 1
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["name"] for r in rows} == {r.name for r in load_results(tiny_run / "results.json").rows}


def test_resume_reruns_a_group_whose_result_lacks_a_setting(tiny_run, tmp_path, monkeypatch, capsys):
    """A killed resume leaves the new job file next to the older result: that result is stale."""
    out = tmp_path / "out"
    shutil.copytree(tiny_run, out)
    run_dir = next(out.glob("run-*"))
    result_path = run_dir / "jobs" / "fora.result.json"
    result = json.loads(result_path.read_text())
    dropped = result["rows"].pop()
    result_path.write_text(json.dumps(result))
    (out / "results.json").unlink()
    monkeypatch.setattr(peer_registry.PEERS["cachedit-dbcache-taylorseer"], "package", "cache_dit_not_installed_here")
    sweep = tiny_run.parent / "sweep.json"
    code, _, err = invoke(monkeypatch, capsys, "bench", "--model", "dit", "--sweep", str(sweep), "--out", str(out),
                          "--resume", *TINY_ARGS)
    assert code == 0, err
    assert "fora: read back" not in err and "steps: read back" in err
    settings = {r["setting"] for r in json.loads(result_path.read_text())["rows"]}
    assert dropped["setting"] in settings


def test_resume_only_a_later_group_still_reports_the_baseline_grid(tiny_run, tmp_path, monkeypatch, capsys):
    """``--resume --only NAME`` may start with a group that was not the run's first: its result has no
    baseline grid of its own, and the report uses the one the first group saved."""
    out = tmp_path / "out"
    shutil.copytree(tiny_run, out)
    (out / "results.json").unlink()
    sweep = tiny_run.parent / "sweep.json"
    code, _, err = invoke(monkeypatch, capsys, "bench", "--model", "dit", "--sweep", str(sweep), "--out", str(out),
                          "--resume", "--only", "steps-ddim", *TINY_ARGS)
    assert code == 0, err
    assert "steps: read back" in err
    results = json.loads((out / "results.json").read_text())
    assert {r["name"] for r in results["rows"]} == {"steps-ddim"}
    assert (out / results["baseline"]["grid"]).is_file() and (out / "report.html").is_file()


# After the load event every <img> has loaded (or failed): its natural size says whether it decoded.
RENDER_CHECK = """<script>
window.addEventListener('load', () => {
  const d = document.createElement('pre'); d.id = 'render-check';
  d.textContent = JSON.stringify([...document.images].map(
    i => ({id: i.id, cls: i.className, w: i.complete ? i.naturalWidth : 0, h: i.complete ? i.naturalHeight : 0})));
  document.body.appendChild(d); });
</script>"""
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: `make test` installs it with apt-get "
                                                  "when run as root (Debian packages chromium, chromium-driver)")
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    page = tmp_path / "report.html"
    page.write_text((tiny_run / "report.html").read_text().replace("</body>", RENDER_CHECK + "</body>"))
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    for _ in range(3):  # a loaded machine can make chromium dump before the page settled: retry
        dump = subprocess.run([str(CHROMIUM), *flags, "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                              capture_output=True, text=True, timeout=120)
        if 'id="render-check">' in dump.stdout:
            break
    assert 'id="render-check">' in dump.stdout, dump.stderr[-2000:]
    marker = dump.stdout.split('id="render-check">', 1)[1].split("</pre>", 1)[0]
    images = json.loads(marker.replace("&quot;", '"'))
    plots = {i["id"]: i for i in images if i["cls"] == "plot"}
    grids = [i for i in images if i["cls"] == "grid"]
    assert set(plots) == {"plot-wall", "plot-macs"}
    assert all(i["w"] > 0 and i["h"] > 0 for i in plots.values()), images
    assert len(grids) >= 2 and all(i["w"] > 0 and i["h"] > 0 for i in grids), images
    shot = tmp_path / "report.png"
    subprocess.run([str(CHROMIUM), *flags, f"--screenshot={shot}", "--window-size=1280,2000",
                    (tiny_run / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000
    keep = tiny_run / "report-screenshot.png"  # left next to the report for a look by hand
    shutil.copy(shot, keep)


def test_report_command_rerenders_from_saved_results(tiny_run, tmp_path, monkeypatch, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_run, moved)  # the results folder can move: grid paths are relative to it
    (moved / "report.html").unlink()
    elsewhere = tmp_path / "elsewhere"
    code, out, err = invoke(monkeypatch, capsys, "report", moved / "results.json", "--out", elsewhere)
    assert code == 0, err
    page = (elsewhere / "report.html").read_text()
    assert page.count("data:image/png;base64,") == (tiny_run / "report.html").read_text().count(
        "data:image/png;base64,")
    assert (elsewhere / "results.md").read_text() == (tiny_run / "results.md").read_text()
    code, out, err = invoke(monkeypatch, capsys, "report", moved / "results.json")
    assert code == 0 and (moved / "report.html").is_file()


@pytest.mark.parametrize("mutate, fragments", [
    (lambda text: text[: len(text) // 2], ["truncated"]),
    (lambda text: json.dumps({**json.loads(text), "format_version": 999}), ["format_version 999", "rerun"]),
    (lambda text: json.dumps({"rows": []}), ["not a diffaccel bench results file"]),
    (lambda text: json.dumps({"model": "dlm", "rows": []}), ["the language model's bench", "results.md"]),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "baseline"}), ["baseline"]),
    (lambda text: json.dumps({**json.loads(text), "samples": {}}), ["samples.n_images", "Field required"]),
    (lambda text: json.dumps({**json.loads(text), "rows": [{**r, "psnr": float("nan")} for r in json.loads(text)[
        "rows"]]}), ["rows.0.psnr", "finite number"]),  # had been ranked, and printed as "nan dB"
])
def test_report_refuses_bad_results_and_keeps_the_good_report(tiny_run, tmp_path, monkeypatch, capsys,
                                                               mutate, fragments):
    good = tmp_path / "good"
    shutil.copytree(tiny_run, good)
    before = (good / "report.html").read_bytes(), (good / "results.md").read_bytes()
    bad = good / "bad.json"
    bad.write_text(mutate((good / "results.json").read_text()))
    code, _, err = invoke(monkeypatch, capsys, "report", bad, "--out", good)
    assert_one_line_error(code, err, *fragments)
    assert ((good / "report.html").read_bytes(), (good / "results.md").read_bytes()) == before
    assert not list(good.glob(".*.tmp"))


@pytest.mark.parametrize("sweep, args, fragments", [
    (None, ["--model", "vae"], ["unknown model 'vae'"]),
    ({"nope": [{}]}, ["--model", "dit"], ["unknown method or peer 'nope'", "fora"]),
    ({}, ["--model", "dit"], ["is empty"]),
    ({"fora": []}, ["--model", "dit"], ["fora has an empty sweep"]),
    ({"fora": [{"intervall": 2}]}, ["--model", "dit"], ["has no setting intervall"]),
    ({"fora": {"interval": 3}}, ["--model", "dit"], ["fora takes a list of settings", '[{"interval": 3}]']),
    ({"fora": [{"interval": "three"}]}, ["--model", "dit"], ["fora's interval is a number (default 3), got 'three'"]),
    ({"tgate": [{"gate_step": 2}]}, ["--model", "dit"], ["tgate does not apply to the dit"]),
    ("{not json", ["--model", "dit"], ["not valid JSON"]),
    ('{"fora": [{"interval": 2}], "fora": [{"interval": 3}]}', ["--model", "dit"], ["names fora twice"]),  # one lost
    ({"fora": [{"interval": 2}, {"interval": 2}]}, ["--model", "dit"], ["fora lists a setting twice"]),
    (None, ["--model", "dit", "--only", "nope"], ["--only", "unknown method or peer 'nope'"]),
    (None, ["--model", "dit", "--steps", "1"], ["--steps 1 leaves nothing to accelerate"]),
    (None, ["--model", "unet", "--only", "fora", "--classes", "blob"], ["unknown class blob"]),
    (None, ["--model", "unet", "--only", "fora", "--classes", "circle,circle"], ["circle is named more than once"]),
    ({"plan": [{"file": "nowhere/plan.json"}]}, ["--model", "dit"], ["plan file nowhere/plan.json does not exist"]),
    ({"plan": [{}]}, ["--model", "dit"], ["a plan entry needs \"file\""]),
    ({"plan": [{"file": str(Path(__file__).parents[1] / "benchmarks/results/plans/unet-dp.json")}]},
     ["--model", "dit"], ["(the unet adapter), not this dit model"]),  # had been skipped after the baseline ran
])
def test_bench_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, sweep, args, fragments):
    extra = []
    if sweep is not None:
        path = tmp_path / "sweep.json"
        path.write_text(sweep if isinstance(sweep, str) else json.dumps(sweep))
        extra = ["--sweep", path]
    out = tmp_path / "out"
    code, _, err = invoke(monkeypatch, capsys, "bench", *args, *extra, "--out", out, "--threads", "1")
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()


def test_default_sweeps_cover_every_method_peer_and_step_baseline():
    for model in ("dit", "unet"):
        sweep = sweeps.default_sweep(model)
        sweeps.validate(sweep, model)
        ours = [n for n, m in METHODS.items() if m.applies(adapter_by_name(model))]
        peers = [n for n, spec in peer_registry.PEERS.items() if model in spec.models]
        for name in ours + peers:
            if name in ("torchao", "quanto"):  # a configuration alone and with our key-step plan
                assert {"cache_keys" in setting for setting in sweep[name]} == {True, False}, name
            else:
                assert name in sweep and len(sweep[name]) >= 4, name
        assert [s["steps"] for s in sweep["steps-ddim"]] == [10, 20, 30]
        assert {"steps-dpm", "steps-unipc", "steps-evodiff"} <= set(sweep)
        quick = sweeps.default_sweep(model, quick=True)
        assert set(quick) == set(sweep) and all(len(quick[n]) == 2 for n in ours + peers)
        groups = plan_groups(sweep)
        assert [g["group"] for g in groups] == [*ours, *peers, "steps"]  # each method and peer in its own process
        assert [g["group"] for g in plan_groups(quick, split_ours=False)] == ["diffaccel", *peers, "steps"]
    assert {"diffusers-fbc", "diffusers-taylorseer", "diffusers-pab", "diffusers-fastercache", "diffusers-magcache",
            "cachedit-dbcache", "cachedit-dbcache-taylorseer"} <= set(sweeps.default_sweep("dit"))
    assert {"deepcache-sdhelper", "tgate", "tomesd"} <= set(sweeps.default_sweep("unet"))


def test_a_flow_matching_model_gets_the_step_baselines_its_flow_solvers_run():
    """SD3 and Flux sample a flow path: the bench's fewer-step rows are its flow solvers (DDIM's step
    there is Euler's, the pipeline's own); EVODiff, which needs a betas schedule, is left out of the
    default sweep and refused by name in a user's sweep."""
    for model in ("sd3", "flux"):
        steps = {n for n in sweeps.default_sweep(model) if n.startswith("steps-")}
        assert steps == {"steps-ddim", "steps-dpm", "steps-unipc"}
        with pytest.raises(SweepError, match=f"steps-evodiff does not apply to the {model} model"):
            sweeps.validate({"steps-evodiff": [{"steps": 8}]}, model)
    assert "steps-evodiff" in sweeps.default_sweep("pixart")


def test_quick_size():
    cfg, sweep = check_config(BenchConfig(model="dit", quick=True))
    data = items(cfg)
    assert data["n_images"] == 12 and cfg.batch_size == 4 and len(data["calls"]) == 3
    labels = [c for call in data["calls"] for c in call["kwargs"]["class_labels"]]
    assert labels[:6] == list(range(6))  # every batch mixes the classes
    units = sum(group_units(len(g["entries"]), 3) for g in plan_groups(sweep, split_ours=False))
    assert units < 230


def _job(model: str, entries: list[dict], tmp_path: Path, steps: int = 4) -> BenchJob:
    cfg = BenchConfig(model=model, per_class=1, batch_size=1, classes=["circle", "square"], steps=steps).resolved()
    data = items(cfg)
    return BenchJob(group="smoke", family="peer", entries=entries, target={"model": model, "sampler": "ddim"},
                    steps=steps, guidance=3.0, threads=1, calls=data["calls"], calib_calls=data["calib_calls"],
                    classes=data["classes"], grid_dir=str(tmp_path), grid_rows=data["grid_rows"], grid_per_row=1)


def test_a_plan_file_runs_as_a_row_like_the_method_that_made_it(tmp_path):
    """A searched plan goes beside the peers and the samplers as a sweep entry ``plan``: the same plan
    from a file gives the row its method's entry gives."""
    from diffaccel.bench.worker import run_group

    path = diffaccel.methods.fora(load_target("dit").pipe, 4, interval=2).save(tmp_path / "plan.json")
    entries = [{"name": "plan", "settings": {"file": str(path)}}, {"name": "fora", "settings": {"interval": 2}}]
    result = run_group(dataclasses.replace(_job("dit", entries, tmp_path), family="diffaccel"))
    assert result["skipped"] == []
    from_file, made = result["rows"]
    assert from_file["name"] == "plan" and made["name"] == "fora"
    assert from_file["speedup_macs"] == made["speedup_macs"] > 1.5 and from_file["psnr"] == made["psnr"]


def _installed(*names):
    missing = [n for n in names if peer_registry.PEERS[n].available()]
    if missing:
        pytest.skip(f"peers not installed: {', '.join(missing)} (pip install 'diffaccel[peers]')")


def test_unet_peers_run_at_tiny_size(tmp_path):
    """DeepCache's helper, T-GATE and ToMe on the embedded U-Net, in-process (they patch instances only)."""
    from diffaccel.bench.worker import run_group

    _installed("deepcache-sdhelper", "tgate", "tomesd")
    entries = [{"name": "deepcache-sdhelper", "settings": {"interval": 2}},
               {"name": "tgate", "settings": {"gate_step": 2, "sp_interval": 1, "warm_up": 0}},
               {"name": "tomesd", "settings": {"ratio": 0.5}}]
    result = run_group(_job("unet", entries, tmp_path, steps=4))
    assert result["skipped"] == []
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["deepcache-sdhelper"]["speedup_macs"] > 1.2
    assert rows["tgate"]["speedup_macs"] > 1.2  # two of four steps without guidance
    assert rows["tomesd"]["speedup_macs"] > 1.0
    for row in rows.values():
        assert torch.isfinite(torch.tensor(row["psnr"])) and row["psnr"] < 100
    assert torch.get_num_threads() == 1


@pytest.mark.filterwarnings("ignore:torch.meshgrid")
def test_diffusers_hooks_run_on_the_dit_and_a_failing_peer_is_skipped_with_its_reason(tmp_path, monkeypatch):

    from diffaccel.bench.worker import run_group

    def broken(ctx, settings):
        raise RuntimeError("The size of tensor a (4) must match the size of tensor b (8)")

    monkeypatch.setitem(peer_registry.PEERS, "diffusers-fbc",
                        dataclasses.replace(peer_registry.PEERS["diffusers-fbc"], open=broken))
    entries = [{"name": "diffusers-taylorseer", "settings": {"interval": 2, "warmup": 1}},
               {"name": "diffusers-pab", "settings": {"skip_range": 2, "timestep_range": [0, 1000]}},
               {"name": "diffusers-magcache", "settings": {"threshold": 0.5, "retention_ratio": 0.0}},
               {"name": "diffusers-fastercache", "settings": {"skip_range": 2}},
               {"name": "diffusers-fbc", "settings": {"threshold": 0.2}}]
    result = run_group(_job("dit", entries, tmp_path, steps=4))
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"diffusers-taylorseer", "diffusers-pab", "diffusers-magcache", "diffusers-fastercache"}
    assert all(r["speedup_macs"] > 1.0 for r in rows.values()), rows
    assert "calibrated" in rows["diffusers-magcache"]["notes"]
    (skip,) = result["skipped"]
    assert skip["name"] == "diffusers-fbc" and skip["setting"] == "threshold=0.2"
    assert "size of tensor" in skip["reason"], skip


def test_quantization_peers_alone_and_with_our_key_steps(tmp_path):
    """torchao and optimum-quanto on the DiT: alone they run every MAC (at int8); with our key-step
    plan they skip most; quanto's kernels are invisible to the FLOP counter, so its MACs are counted
    at full precision (and the row says so)."""
    from diffaccel.bench.worker import run_group

    _installed("torchao", "quanto")
    entries = [{"name": "torchao", "settings": {"config": "int8-dynamic"}},
               {"name": "torchao", "settings": {"config": "int8-weight-only", "cache_keys": 2}},
               {"name": "quanto", "settings": {"weights": "qint8"}},
               {"name": "quanto", "settings": {"weights": "qint8", "activations": "qint8", "cache_keys": 2}}]
    result = run_group(_job("dit", entries, tmp_path, steps=4))
    assert result["skipped"] == []
    alone_torchao, cached_torchao, alone_quanto, cached_quanto = result["rows"]
    for row in (alone_torchao, alone_quanto):
        assert row["speedup_macs"] == pytest.approx(1.0, rel=0.02) and row["psnr"] < 100
    for row in (cached_torchao, cached_quanto):
        assert row["speedup_macs"] > 1.5 and "keysteps" in row["notes"]
    assert "full-precision" in alone_quanto["notes"]


def test_the_headline_keeps_adherence_within_one_point_where_it_is_scored():
    rows = [{"name": "fast", "family": "diffaccel", "psnr": 35.0, "speedup_wall": 3.0, "speedup_macs": 3.0,
             "setting": "loose", "adherence": 0.80},
            {"name": "fast", "family": "diffaccel", "psnr": 33.0, "speedup_wall": 2.0, "speedup_macs": 2.0,
             "setting": "tight", "adherence": 0.895},
            {"name": "blind", "family": "peer", "psnr": 40.0, "speedup_wall": 5.0, "speedup_macs": 5.0,
             "setting": "s", "adherence": None}]
    gated = summarize(rows, [], 30.0, baseline_adherence=0.90)
    assert gated["fast"]["setting"] == "tight" and gated["blind"]["speedup_wall"] is None
    assert "adherence within 1 pt of the baseline" in gated["blind"]["note"]
    slack = rows[:1] + [{**rows[1], "adherence": 0.885}]  # 1.5 points under: within the old 2, not within 1
    assert summarize(slack, [], 30.0, baseline_adherence=0.90)["fast"]["speedup_wall"] is None
    low = summarize(rows[:1], [], 30.0, baseline_adherence=0.90)["fast"]  # held back by adherence alone: says so
    assert low["speedup_wall"] is None and "3.00x at 35.0 dB with loose, but adherence 80.0%" in low["note"]
    ungated = summarize(rows, [], 30.0)  # no adherence scored (embedded models, user pipelines): PSNR alone
    assert ungated["fast"]["setting"] == "loose" and ungated["blind"]["speedup_wall"] == 5.0


def test_the_headline_can_bound_the_tail_as_well_as_the_mean():
    rows = [{"name": "steps", "family": "steps", "psnr": 31.0, "psnr_p5": 17.0, "speedup_wall": 4.0,
             "speedup_macs": 4.0, "setting": "steps=11"},
            {"name": "steps", "family": "steps", "psnr": 37.0, "psnr_p5": 26.0, "speedup_wall": 2.5,
             "speedup_macs": 2.5, "setting": "steps=20"},
            {"name": "plan", "family": "diffaccel", "psnr": 34.0, "psnr_p5": 27.0, "speedup_wall": 6.0,
             "speedup_macs": 6.0, "setting": "p"},
            {"name": "old", "family": "peer", "psnr": 40.0, "speedup_wall": 3.0, "speedup_macs": 3.0, "setting": "o"}]
    mean_only = summarize(rows, [], 30.0)
    assert mean_only["steps"]["setting"] == "steps=11" and mean_only["old"]["speedup_wall"] == 3.0
    tail = summarize(rows, [], 30.0, tail=25.0)
    assert tail["steps"]["setting"] == "steps=20" and tail["plan"]["speedup_wall"] == 6.0
    assert tail["old"]["speedup_wall"] is None and "5th pct not recorded" in tail["old"]["note"]
    assert "and 5th pct >= 25 dB" in tail["old"]["note"]
    below = summarize(rows[:1], [], 30.0, tail=25.0)["steps"]
    assert below["speedup_wall"] is None and "4.00x at 31.0 dB with steps=11, but 5th pct 17.0 dB" in below["note"]


def test_report_tail_ranks_the_saved_rows_again(tiny_run, tmp_path, monkeypatch, capsys):
    saved = json.loads((tiny_run / "results.json").read_text())
    assert "x wall (" in (tiny_run / "results.md").read_text().split("## All settings")[0]  # some row counts unbounded
    above = max(r["psnr_p5"] for r in saved["rows"] if r["psnr_p5"] is not None) + 1.0
    code, out, err = invoke(monkeypatch, capsys, "report", tiny_run / "results.json", "--tail", str(above),
                            "--out", tmp_path / "tail")
    assert code == 0, err
    md = (tmp_path / "tail" / "results.md").read_text()
    assert f"## Speedup at PSNR >= 30 dB and 5th pct >= {above:g} dB" in md
    assert "x wall (" not in md.split("## All settings")[0]  # no row clears a bound above every row's tail
    assert json.loads((tiny_run / "results.json").read_text()) == saved  # the saved results are left as they were
    (tmp_path / "partial.json").write_text('{"rows": []}')  # what an interrupted run leaves
    code, out, err = invoke(monkeypatch, capsys, "report", tmp_path / "partial.json")
    assert code != 0 and "finish it with the same `diffaccel bench` command and --resume" in err
    ranked = json.loads((tmp_path / "tail" / "results.json").read_text())  # beside its report: the folder agrees
    assert ranked["psnr_p5_floor"] == above
    assert [{**r, "grid": None} for r in ranked["rows"]] == [{**r, "grid": None} for r in saved["rows"]]
    code, out, err = invoke(monkeypatch, capsys, "report", tmp_path / "tail" / "results.json")
    assert code == 0, err  # its grid paths lead from its own folder to the bench's images (had been "missing")
    code, out, err = invoke(monkeypatch, capsys, "report", tiny_run / "results.json", "--tail", "nan",
                            "--out", tmp_path / "bad")
    assert code != 0 and "--tail must be a finite number" in err and not (tmp_path / "bad").exists()


def test_the_default_key_step_rows_follow_the_run_s_step_count():
    """Written for 50 steps, 12 of them keys had refused the whole keysteps family at --steps 10."""
    for steps in (10, 4):
        sweep = sweeps.default_sweep("dit", steps=steps)
        keys = [s["keys"] for s in sweep["keysteps"]] + [s["cache"]["keys"] for s in sweep["ptq"] if "cache" in s]
        assert keys and all(1 <= k < steps for k in keys), (steps, keys)
    assert [s["keys"] for s in sweeps.default_sweep("unet")["keysteps"]] == [8, 10, 12, 14]  # 50 steps: as written


def test_resume_with_no_run_to_continue_says_a_new_one_starts(tmp_path):
    from diffaccel.bench.runner import _start

    said = []
    cfg = BenchConfig(model="dit", quick=True, per_class=1, classes=["circle"], steps=4, batch_size=1, resume=True)
    run = _start(cfg, tmp_path / "out", said.append)  # had started afresh without a word
    assert run.run_dir.parent == tmp_path / "out" and said and "--resume: no run in" in said[0], said


def test_a_zero_count_in_the_python_config_is_refused_not_replaced_by_the_preset():
    for key in ("per_class", "batch_size", "timed_pairs"):  # 0 had become 100, 60 or 5
        with pytest.raises(BenchError, match=f"--{key.replace('_', '-')} must be >= 1"):
            check_config(BenchConfig(model="dit", **{key: 0}))


def test_a_bar_in_a_setting_does_not_shift_the_markdown_table(tiny_run):
    saved = load_results(tiny_run / "results.json")
    row = saved.rows[0].model_copy(update={"setting": "file=odd|plan.json"})
    lines = markdown(saved.model_copy(update={"rows": [row]})).splitlines()
    header = next(line for line in lines if line.startswith("| family"))
    odd = next(line for line in lines if "odd" in line)
    assert len(re.split(r"(?<!\\)\|", odd)) == len(re.split(r"(?<!\\)\|", header))  # unescaped bars: columns
