"""The command line: the main job and its errors (one line, non-zero exit, no traceback)."""

import json
import math
import shutil
import warnings
from dataclasses import dataclass

import pytest

from conftest import requires_weights, run_cli
from diffaccel.calibration.reference import identity_plan
from diffaccel.plan import CalibrationInfo, Plan
from diffaccel.quant import QuantSpec
from diffaccel.solvers import SolverSpec
from diffaccel.zoo.weights import WEIGHTS_DIR, load_pipeline


@dataclass
class Result:
    exit_code: int
    output: str
    error: str


@pytest.fixture
def run(monkeypatch, capsys):
    """Run the real entry point (as the installed `diffaccel` script does) and capture it."""

    def invoke(*args) -> Result:
        return Result(*run_cli(monkeypatch, capsys, *args))

    return invoke


def assert_clean_error(result, *fragments):
    assert result.exit_code != 0
    lines = result.error.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.error
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@requires_weights
def test_generate_writes_grid_and_record(run, tmp_path):
    result = run("generate", "--classes", "circle,ring", "--per-class", "2", "--steps", "4", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "record.json").read_text())
    for key in ("model", "sampler", "steps", "guidance", "seed", "n_images", "accuracy", "fd", "fd_floor",
                "macs_per_image", "seconds"):
        assert key in record
    assert record["n_images"] == 4 and record["steps"] == 4 and (tmp_path / "grid.png").stat().st_size > 0
    assert "accuracy" in result.output and str(tmp_path) in result.output


@requires_weights
def test_generate_with_a_method_and_compare_records_speed_and_fidelity(run, tmp_path):
    result = run("generate", "--model", "unet", "--classes", "square", "--per-class", "2", "--steps", "6",
                 "--method", "deepcache", "--interval", "3", "--compare", "--out", str(tmp_path),
                 "--save-plan", str(tmp_path / "plan.json"))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["plan"]["method"] == "deepcache" and record["plan"]["params"]["interval"] == 3
    assert record["speedup_macs"] > 1.0 and record["speedup_wall"] > 0 and 0 < record["ssim"] <= 1
    assert record["psnr"] > 10
    again = run("generate", "--model", "unet", "--classes", "square", "--per-class", "2", "--steps", "6",
                "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "again"))
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again" / "record.json").read_text())["speedup_macs"] == record["speedup_macs"]
    assert (tmp_path / "comparison.png").is_file()
    alone = run("generate", "--model", "unet", "--classes", "square", "--per-class", "1", "--steps", "6",
                "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path))  # the same folder, no --compare
    assert alone.exit_code == 0, alone.output
    assert not (tmp_path / "comparison.png").exists() and not (tmp_path / "grid_baseline.png").exists()


@requires_weights
def test_generate_with_a_precision_runs_every_step_in_it_and_saves_it_in_the_plan(run, tmp_path):
    args = ("generate", "--model", "dit", "--classes", "circle", "--per-class", "2", "--steps", "4", "--compare")
    result = run(*args, "--method", "fora", "--interval", "2", "--precision", "bfloat16",
                 "--save-plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "fora"))
    assert result.exit_code == 0, result.output
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.precision == "bfloat16" and plan.method == "fora"
    record = json.loads((tmp_path / "fora" / "record.json").read_text())
    assert record["speedup_macs"] > 1 and 10 < record["psnr"] < 100
    alone = run(*args, "--precision", "bfloat16", "--out", str(tmp_path / "alone"))  # every unit, every step
    assert alone.exit_code == 0, alone.output
    record = json.loads((tmp_path / "alone" / "record.json").read_text())
    assert record["speedup_macs"] == pytest.approx(1.0) and 30 < record["psnr"] < 100


@requires_weights
def test_plan_show_describes_a_searched_plan_with_its_sampler_and_precision(run, tmp_path):
    """The joint search's plans carry a solver section and may carry a precision: ``plan show`` maps
    them and counts their MACs on the embedded model (the probe runs without a pipeline's sampler)."""
    model = load_pipeline("unet").denoiser
    plan = identity_plan(model).model_copy(update={
        "solver": SolverSpec(name="unipc", steps=4), "num_steps": 4, "schedule": ["CCCCCCCC"] * 3 + ["CCCRRRCC"],
        "precision": "bfloat16"})
    plan.save(tmp_path / "plan.json")
    result = run("plan", "show", str(tmp_path / "plan.json"))
    assert result.exit_code == 0, result.output
    assert "sampler: unipc 4" in result.output and "autocast to bfloat16" in result.output
    assert "fewer), measured on the shipped unet model's denoiser" in result.output
    # a static plan of these units fits SD's U-Net too: both are measured (it had been counted on the embedded one
    # alone, also for SD plans, whose 1.61x it read as 1.86x), or the one --model names
    assert "measured on the shipped sd model's denoiser" in result.output
    only = run("plan", "show", str(tmp_path / "plan.json"), "--model", "sd")
    assert only.exit_code == 0 and [line for line in only.output.splitlines() if "MACs:" in line] == [
        line for line in result.output.splitlines() if "shipped sd model" in line]
    identity_plan(model).model_copy(update={"precision": "bfloat16"}).save(tmp_path / "whole.json")
    whole = run("plan", "show", str(tmp_path / "whole.json"))
    assert whole.exit_code == 0 and "every unit computes at every step" in whole.output
    # fitted on another U-Net with the same units (the SD pipeline's): counted on that one alone
    other = plan.model_copy(update={"calibration": CalibrationInfo(weights="0c5f94bf995743c2", calls=1, images=1)})
    other.save(tmp_path / "other.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shown = run("plan", "show", str(tmp_path / "other.json"))
    macs = [line for line in shown.output.splitlines() if line.startswith("MACs:")]
    assert shown.exit_code == 0 and len(macs) == 1 and "shipped sd model" in macs[0], shown.output
    unknown = plan.model_copy(update={"calibration": CalibrationInfo(weights="0123456789abcdef", calls=1, images=1)})
    unknown.save(tmp_path / "unknown.json")
    assert "the plan does not fit a shipped model" in run("plan", "show", str(tmp_path / "unknown.json")).output


@requires_weights
def test_generate_counts_a_fewer_step_plan_against_the_baselines_own_run(run, tmp_path):
    """A plan that swaps the sampler computes every step it runs (the executor's ratio is 1), yet runs
    5 of the baseline's 10 steps: the MAC speedup compares the two runs, as bench does."""
    model = load_pipeline("dit").denoiser
    identity_plan(model).model_copy(update={"solver": SolverSpec(name="unipc", steps=5)}).save(tmp_path / "p.json")
    args = ("generate", "--model", "dit", "--classes", "circle", "--per-class", "2", "--steps", "10",
            "--plan", str(tmp_path / "p.json"))
    result = run(*args, "--compare", "--out", str(tmp_path / "compared"))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "compared" / "record.json").read_text())
    assert record["speedup_macs"] == pytest.approx(2.0, rel=0.01) and record["speedup_macs_executor"] == 1
    assert record["baseline"]["macs_per_image"] / record["macs_per_image"] == pytest.approx(record["speedup_macs"])
    assert "2.00x MACs" in result.output
    assert (record["sampler"], record["steps"], record["baseline_sampler"], record["baseline_steps"]) == \
        ("unipc", 5, "ddim", 10)  # what ran, not the command's --steps
    assert "5 unipc steps" in result.output
    alone = run(*args, "--out", str(tmp_path / "alone"))  # no baseline run: no claim of a speedup
    assert alone.exit_code == 0, alone.output
    assert "speedup_macs" not in json.loads((tmp_path / "alone" / "record.json").read_text())


@pytest.mark.parametrize("args,fragments", [
    (["--classes", "hexagon"], ["unknown class hexagon", "circle"]),
    (["--classes", "circle, circle"], ["class circle is named more than once"]),  # had made the images twice
    (["--steps", "0"], ["--steps"]),
    (["--steps", "-3"], ["--steps"]),
    (["--guidance", "abc"], ["--guidance"]),
    (["--guidance", "nan"], ["--guidance must be a finite number"]),
    (["--weights", "/nonexistent/weights"], ["does not exist"]),
    (["--method", "warpdrive"], ["unknown method 'warpdrive'"]),
    (["--method", "fora", "--param", "speed=11"], ["fora has no setting speed"]),
    (["--method", "deepcache"], ["deepcache does not apply to a DiTTransformer2DModel"]),
    (["--precision", "int4"], ["precision", "bfloat16"]),
    (["--precision", "int4", "--method", "warpdrive"], ["precision", "bfloat16"]),  # refused before the model loads
    (["--quant-backend", "int8"], ["--quant-backend goes with --quant"]),  # was ignored
    (["--compare"], ["--compare needs a plan"]),  # was ignored
    (["--save-plan", "p.json"], ["--save-plan needs a plan"]),  # had written nothing without a word
    (["--quant", "w8a8", "--quant-backend", "int4"], ["backend: Input should be"]),  # names the setting
])
def test_generate_bad_input_gives_one_line_error(run, args, fragments, tmp_path):
    result = run("generate", "--steps", "2", "--per-class", "1", "--out", str(tmp_path), *args)
    assert_clean_error(result, *fragments)


def test_the_language_model_refuses_several_processes_and_an_empty_row_list(run, monkeypatch, tmp_path):
    assert_clean_error(run("generate", "--model", "dlm", "--parallel", "cfg", "--out", str(tmp_path / "g")),
                       "--model dlm runs in one process")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them
    monkeypatch.setenv("RANK", "1")
    assert_clean_error(run("search", "--model", "dlm", "--out", str(tmp_path / "s")), "[rank 1/2] --model dlm")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert_clean_error(run("bench", "--model", "dlm", "--only", "", "--out", str(tmp_path / "b")), "--only is empty")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args,fragment", [
    (["generate", "--quant", "w8a8"], "does not take --quant (image-model options)"),
    (["generate", "--sampler", "ddim", "--classes", "circle"], "does not take --sampler, --classes"),
    (["generate", "--guidance", "3"], "--guidance"),  # given at its default value: still not for dlm
    (["search", "--strategy", "joint", "--time", "1m"], "does not take --strategy, --time"),
    (["search", "--objective", "bops"], "searches by macs or latency, not bops"),
    (["bench", "--seed", "5", "--guidance", "9"], "does not take --seed, --guidance"),
    (["generate", "--save-plan", "plan.json"], "--save-plan needs a plan to save"),  # wrote nothing, silently
])
def test_the_language_model_refuses_image_options_instead_of_ignoring_them(run, args, fragment, tmp_path):
    assert_clean_error(run(*args, "--model", "dlm", "--out", str(tmp_path / "o")), fragment)
    assert not any(tmp_path.iterdir())


@requires_weights
def test_options_that_would_be_ignored_or_match_nothing_are_refused(run, tmp_path):
    assert_clean_error(run("search", "--budget", "", "--out", str(tmp_path / "s")), "the budget '' needs")
    assert_clean_error(run("quantize", "--keep", "nosuchlayer*", "--out", str(tmp_path / "q")),
                       "override 'nosuchlayer*' matches no Linear or Conv2d layer")
    assert not (tmp_path / "s").exists() and not (tmp_path / "q").exists()
    made = run("plan", "make", "fora", "--model", "dit", "--steps", "6", "--out", str(tmp_path / "fora.json"))
    assert made.exit_code == 0, made.error
    assert_clean_error(run("plan", "show", str(tmp_path / "fora.json"), "--model", "unet"),
                       "this plan is for a DiTTransformer2DModel (the dit adapter), not the shipped unet model")
    assert "6 denoiser evaluations" in run("plan", "show", str(tmp_path / "fora.json")).output  # not "6 ddim steps"
    (tmp_path / "ranges.safetensors").write_bytes(b"")  # never read: the refusal comes first
    ranges = QuantSpec(calibration=str(tmp_path / "ranges.safetensors"))
    quantized = Plan.load(tmp_path / "fora.json").with_quant(ranges)
    quantized.save(tmp_path / "w8.json")  # --quant would replace its quantization silently
    assert_clean_error(run("generate", "--model", "dit", "--plan", str(tmp_path / "w8.json"), "--quant", "w4a8",
                           "--out", str(tmp_path / "g")), "the plan is already quantized (W8A8 fake): drop --quant")
    assert not (tmp_path / "g").exists()


def test_an_output_folder_taken_by_a_file_or_a_plan_folder_is_a_one_line_error(run, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    result = run("generate", "--steps", "2", "--per-class", "1", "--out", str(taken))
    assert_clean_error(result, str(taken), "is a file: give a folder")  # before any sampling (had been after it)
    assert taken.read_text() == "a file"
    result = run("generate", "--steps", "2", "--per-class", "1", "--out", str(tmp_path / "o"), "--plan", str(tmp_path))
    assert_clean_error(result, "is a folder: give the plan file in it")


def test_corrupt_weights_give_a_clear_error(run, tmp_path):
    if not (WEIGHTS_DIR / "dit").exists():
        pytest.skip("no shipped weights")
    broken = tmp_path / "dit"
    shutil.copytree(WEIGHTS_DIR / "dit", broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    result = run("generate", "--weights", str(broken), "--steps", "2", "--per-class", "1", "--out", str(tmp_path))
    assert_clean_error(result, "corrupt")
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    result = run("generate", "--weights", str(broken), "--steps", "2", "--per-class", "1", "--out", str(tmp_path))
    assert_clean_error(result, "no weights in")


def test_bad_plan_file_is_rejected_before_anything_runs(run, tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"version": 1, "adapter": "dit", "units": ["blocks.0"')
    result = run("generate", "--plan", str(bad), "--out", str(tmp_path / "out"))
    assert_clean_error(result, "not valid JSON")
    assert not (tmp_path / "out").exists()
    result = run("plan", "show", str(bad))
    assert_clean_error(result, "not valid JSON")


@requires_weights
def test_plan_make_and_show(run, tmp_path):
    path = tmp_path / "p.json"
    result = run("plan", "make", "fora", "--model", "dit", "--steps", "10", "--interval", "2", "--out", str(path))
    assert result.exit_code == 0, result.output
    shown = run("plan", "show", str(path))
    assert shown.exit_code == 0, shown.output
    assert "MACs:" in shown.output and "of the full model" in shown.output
    assert shown.output.count("########") == 5  # 5 of 10 steps compute every block


@requires_weights
def test_search_under_a_judge_budget_uses_the_models_evaluator(run, tmp_path):
    """On an embedded model the judge is its evaluator (the class read back); the closing line and the
    summary give the chosen plan's judged change on the judge's images."""
    out = tmp_path / "s"
    result = run("search", "--model", "dit", "--steps", "4", "--strategy", "dp", "--budget", "psnr>=10,judge>=-1",
                 "--calib-per-class", "1", "--heldout-per-class", "1", "--pairs", "1", "--judge-images", "8",
                 "--out", str(out))
    assert result.exit_code == 0, result.error
    summary = json.loads((out / "summary.json").read_text())
    judged = summary["judged"]
    assert judged["images"] == 12 and -1 <= judged["change"] <= 1  # the 6 classes' calls twice: >= 8 images
    tried = summary["validation_tried"]
    assert any(t["judged"] is not None for t in tried)
    for t in tried:  # a plan its PSNR confirms is judged, and kept only within 1 point
        assert t["met"] == (t["judged"] is not None and t["judged"]["bound"] * 100 >= -1)
        assert t["judged"] is None or t["judged"]["bound"] <= t["judged"]["change"]
    if summary["validation_confirmed"]:
        assert judged["bound"] * 100 >= -1
    assert summary["heldout_judged"] is not None and f"judged {judged['change'] * 100:+.1f} pt" in result.output


@requires_weights
def test_a_rerun_of_a_search_takes_the_sizes_its_first_run_was_given(run, tmp_path, monkeypatch):
    """The calibration set is sized from a timed run: on a busier machine the same command sized
    another one, and the stored search refused it ("another calibration set"). A rerun in the same
    --out takes the sizes the first run recorded there, and resumes."""
    from diffaccel.cli import search as search_cli

    timed = iter([1, 2])  # what the timed run affords: less, then more
    monkeypatch.setattr(search_cli, "affordable_sizes",
                        lambda probe, steps, limit, pairs, calib, held, log: (calib or next(timed), held or 1))
    out = tmp_path / "s"
    args = ("search", "--model", "dit", "--steps", "4", "--strategy", "dp", "--budget", "psnr>=10", "--pairs", "1",
            "--time", "5m", "--out", str(out))
    first = run(*args)
    assert first.exit_code == 0, first.error
    assert json.loads((out / "sizes.json").read_text()) == {"calibration": 1, "heldout": 1}
    again = run(*args)
    assert again.exit_code == 0, again.error
    assert "as the search in" in again.error and json.loads((out / "sizes.json").read_text())["calibration"] == 1


def test_more_refusals_come_before_the_run_and_say_what_is_wrong(run, tmp_path):
    """--save-plan naming a folder was refused only after the whole run (its images written); a plan
    file whose version is the text "1" said "has version 1; this diffaccel reads version 1"; --classes
    on a text-to-image model blamed a --pipeline that was not given."""
    (tmp_path / "a_folder").mkdir()
    assert_clean_error(run("generate", "--model", "dit", "--method", "fora", "--steps", "5", "--out", tmp_path / "g",
                           "--save-plan", tmp_path / "a_folder"), "is a folder: name a .json file")
    (tmp_path / "a_file").write_text("")  # a path under a file cannot be made (nor, for root, one under /proc)
    assert_clean_error(run("generate", "--model", "dit", "--method", "fora", "--steps", "5", "--out", tmp_path / "g",
                           "--save-plan", tmp_path / "a_file" / "plan.json"), "cannot write a file in")
    assert not (tmp_path / "g").exists()
    plan = json.loads(identity_plan_json())
    (tmp_path / "v.json").write_text(json.dumps({**plan, "version": "1"}))
    assert_clean_error(run("plan", "show", tmp_path / "v.json"), "has version '1'; this diffaccel reads version 1")
    assert_clean_error(run("generate", "--model", "pixart", "--classes", "circle", "--out", tmp_path / "p"),
                       "--classes is for the class-label models")


def identity_plan_json() -> str:
    from diffaccel.zoo.models import build_dit

    return identity_plan(build_dit(num_layers=1)).to_json()


@requires_weights
def test_an_lm_bench_reads_its_budget_before_any_row_runs(run, tmp_path):
    """A bad budget was found only when the search row ran, after the other rows, with an empty --out left."""
    assert_clean_error(run("bench", "--model", "dlm", "--quick", "--budget", "acc>=x", "--out", tmp_path / "b"),
                       "cannot read the budget 'acc>=x'")
    assert not (tmp_path / "b").exists()


def test_a_warning_in_a_group_of_processes_names_its_rank(monkeypatch, capsys):
    from diffaccel.cli.common import _one_line_warning

    _one_line_warning(UserWarning("alone"), UserWarning, "x.py", 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    _one_line_warning(UserWarning("prompt 1 is outside"), UserWarning, "x.py", 1)  # had been untagged
    assert capsys.readouterr().err.splitlines() == ["warning: alone", "warning: [rank 1/2] prompt 1 is outside"]


def test_ctrl_c_says_it_was_interrupted_and_what_was_kept(monkeypatch, capsys):
    import diffaccel.cli
    import diffaccel.cli.plans

    class Interrupted(dict):
        def items(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(diffaccel.cli.plans, "METHODS", Interrupted())
    monkeypatch.setattr("sys.argv", ["diffaccel", "methods"])
    with pytest.raises(SystemExit) as exit_:
        diffaccel.cli.main()
    err = capsys.readouterr().err  # had been empty: typer returns Ctrl-C as code 130 itself
    assert exit_.value.code == 130 and err.startswith("interrupted: what was finished is kept")


def test_the_search_clock_starts_when_importing_diffaccel_began_for_the_process_s_own_command(monkeypatch):
    """Importing torch and diffusers took ~5 s before the search's clock started: a 1-minute search ran 66 s."""
    import time

    import diffaccel
    from diffaccel.cli import common

    monkeypatch.setattr(common, "COMMAND_STARTED", diffaccel.IMPORT_STARTED)  # as cli.script sets it
    assert common.command_started() == diffaccel.IMPORT_STARTED < time.time()
    assert abs(common.command_started() - time.time()) < 1  # read once: a later command in-process starts now


def test_the_search_line_shows_bit_ops_only_for_a_quantized_plan():
    from diffaccel.cli.search import summary_line

    s = {"model": "m", "strategy": "joint", "speedup_macs": 4.0, "speedup_wall": 3.5, "calib_psnr": 31.0,
         "heldout_psnr": 30.5, "bops_fraction": 0.25, "quant": None}
    assert "bit-ops" not in summary_line(s)  # the joint search sets bops = MACs when nothing is quantized
    assert "4.00x bit-ops" in summary_line({**s, "quant": {"label": "W8A8"}})


def test_a_prompt_drawing_several_images_gets_a_grid_row_of_its_own():
    """Two prompt lines, the second with num_images_per_prompt 3, each called twice: the grid had laid
    the 8 images out 4 per row, so the first row held both prompts' images."""
    import torch

    from diffaccel.calibration.workload import Call
    from diffaccel.generate import grid_array, prompt_rows

    calls = [Call({"prompt": "a"}, (0,)), Call({"prompt": "a"}, (1,)),
             Call({"prompt": "b", "num_images_per_prompt": 3}, (0,)),
             Call({"prompt": "b", "num_images_per_prompt": 3}, (1,))]
    rows = prompt_rows(calls, prompts=2)
    assert rows == [2, 6]
    images = torch.cat([torch.zeros(2, 3, 4, 4), torch.ones(6, 3, 4, 4) * 0.5])
    grid = grid_array(images, rows)
    assert grid.shape[:2] == (2 * 5 + 1, 6 * 5 + 1)
    assert (grid[1:5, 1:5] == 0).all() and (grid[1:5, 6:10] == 0).all()  # prompt a's two images
    assert (grid[1:5, 11:] == 255).all() and (grid[6:10, 1:5] == 128).all()  # then blank; prompt b below


def test_a_nan_image_scores_zero_db_and_leaves_the_mean_ssim_finite():
    import torch

    from diffaccel.eval.fidelity import fidelity

    reference = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images = reference.clone()
    images[0] = float("nan")  # a peer's float16 overflow
    scores = fidelity(images, reference)
    assert scores["psnr_min"] == 0.0 and all(map(math.isfinite, scores.values())), scores  # SSIM had been NaN


def test_plan_show_reads_a_plan_from_a_pipe_and_says_what_it_cannot_count(monkeypatch, capsys, tmp_path):
    import os
    import threading

    code, _, err = run_cli(monkeypatch, capsys, "plan", "make", "fora", "--model", "dit", "--steps", "10",
                           "--out", tmp_path / "fora.json")
    assert code == 0, err
    text = (tmp_path / "fora.json").read_text()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(text))
    writer.start()
    code, out, err = run_cli(monkeypatch, capsys, "plan", "show", fifo)  # read twice: had been "not valid JSON"
    writer.join()
    assert code == 0 and "MACs:" in out, err
    bottleneck = {**json.loads(text), "solver": {"name": "ddim", "steps": 10, "bottleneck": [3, 4, 3]}}
    (tmp_path / "bn.json").write_text(json.dumps(bottleneck))
    code, out, err = run_cli(monkeypatch, capsys, "plan", "show", tmp_path / "bn.json")
    assert code == 0 and "cannot reuse across a change of resolution" in out and "x fewer" not in out, out
    code, _, err = run_cli(monkeypatch, capsys, "plan", "make", "fora", "--model", "dit", "--steps", "10",
                           "--interval", "2", "--param", "interval=3", "--out", tmp_path / "twice.json")
    assert code == 2 and "interval is given twice" in err and not (tmp_path / "twice.json").exists()


@requires_weights
def test_a_quantized_plan_saved_by_generate_records_what_it_was_calibrated_on(monkeypatch, capsys, tmp_path):
    """It had no calibration section, so it ran under another scheduler without the warning a plan
    made by `diffaccel quantize` gives."""
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", "dit", "--quant", "w8a8", "--per-class", "1",
                           "--classes", "circle", "--steps", "4", "--threads", "1", "--out", tmp_path / "g",
                           "--save-plan", tmp_path / "q.json")
    assert code == 0, err
    plan = Plan.load(tmp_path / "q.json")
    assert plan.method == "ptq" and plan.calibration is not None and plan.calibration.scheduler == "DDIMScheduler"
