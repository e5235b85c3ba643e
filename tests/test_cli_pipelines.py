"""The command line on a user's pipeline folder (``--pipeline PATH --prompts FILE``) and its errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from conftest import run_cli
from diffaccel.calibration.reference import identity_plan
from diffaccel.plan import Plan
from diffaccel.solvers import SolverSpec
from stock_pipelines import build, flow_with_text_encoders


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    pipe, _ = build("sd-pndm")
    pipe.save_pretrained(root / "sd")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n\n# a comment\n{\"prompt\": \"a large blue circle\", "
                       "\"guidance_scale\": 4.0}\n")
    return root / "sd", prompts


def ok(monkeypatch, capsys, *args) -> str:
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    return out


def one_line_error(monkeypatch, capsys, *args) -> str:
    code, _, err = run_cli(monkeypatch, capsys, *args)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_generate_with_a_method_on_a_pipeline_folder(monkeypatch, capsys, sd_folder, tmp_path):
    folder, prompts = sd_folder
    out = ok(monkeypatch, capsys, "generate", "--pipeline", folder, "--prompts", prompts, "--steps", "4",
             "--guidance", "5", "--per-class", "2", "--method", "fora", "--interval", "2", "--compare",
             "--out", tmp_path, "--save-plan", tmp_path / "plan.json")
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["n_images"] == 4 and record["weights"] == str(folder) and record["speedup_macs"] > 1
    assert record["prompts"] == ["a red circle on a blue background", "a large blue circle"]
    assert record["guidance"] == [4.0, 5.0] and record["sampler"] == "PNDMScheduler"  # the calls' own, per line
    assert "4 PNDMScheduler steps, guidance 4/5" in out
    assert 0 < record["psnr_p5"] <= record["psnr"] and "speedup" in out
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.num_steps == 5  # PNDM evaluates the model once more than its 4 steps
    # a plan made for other steps is mapped to the run, and the record says so
    ok(monkeypatch, capsys, "generate", "--pipeline", folder, "--prompts", prompts, "--steps", "7", "--per-class",
       "1", "--plan", tmp_path / "plan.json", "--out", tmp_path / "mapped", "--save-plan", tmp_path / "ran.json")
    mapped = json.loads((tmp_path / "mapped" / "record.json").read_text())
    assert mapped["resampled_from"] == 5 and mapped["work"]["steps"] == 8
    assert mapped["plan"]["num_steps"] == Plan.load(tmp_path / "ran.json").num_steps == 8  # the plan as it ran


def test_search_and_quantize_on_a_pipeline_folder(monkeypatch, capsys, sd_folder, tmp_path):
    folder, prompts = sd_folder
    out = ok(monkeypatch, capsys, "search", "--pipeline", folder, "--prompts", prompts, "--steps", "4",
             "--strategy", "dp", "--budget", "psnr>=10", "--calib-per-class", "1", "--heldout-per-class", "1",
             "--pairs", "1", "--out", tmp_path / "search")
    summary = json.loads((tmp_path / "search" / "summary.json").read_text())
    assert summary["model"] == "sd" and summary["calib_images"] == 2 and "held-out" in out
    found = Plan.load(tmp_path / "search" / "plan.json")
    assert found.calibration.inputs[0] == "a red circle on a blue background"
    assert "4 steps, guidance 3/4" in found.calibration.seeds  # the second prompt line sets its own 4
    code, _, err = run_cli(monkeypatch, capsys, "search", "--pipeline", folder, "--prompts", prompts, "--budget",
                           "psnr>=10,judge>=-1", "--out", tmp_path / "judged")
    assert code != 0 and "no judge was given" in err and not (tmp_path / "judged" / "summary.json").exists()
    ok(monkeypatch, capsys, "quantize", "--pipeline", folder, "--prompts", prompts, "--steps", "4", "--per-class",
       "1", "--out", tmp_path / "quant")
    plan = Plan.load(tmp_path / "quant" / "plan.json")
    assert plan.quant is not None and plan.calibration.calls == 2


def test_bad_pipeline_folders_and_prompt_files_are_one_line_errors(monkeypatch, capsys, sd_folder, tmp_path):
    folder, prompts = sd_folder
    (tmp_path / "empty").mkdir()
    assert "not a diffusers pipeline folder" in one_line_error(
        monkeypatch, capsys, "generate", "--pipeline", tmp_path / "empty", "--prompts", prompts)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    assert "no adapter for UNet2DModel" in one_line_error(
        monkeypatch, capsys, "generate", "--pipeline", tmp_path / "ddpm", "--prompts", prompts)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert "pickled weights (.bin) only" in one_line_error(
        monkeypatch, capsys, "generate", "--pipeline", tmp_path / "pickled", "--prompts", prompts)
    mixed = tmp_path / "mixed"  # one component pickled, the others safetensors: named, never unpickled
    shutil.copytree(folder, mixed)
    for weights in (mixed / "unet").glob("*.safetensors"):
        weights.unlink()
    (mixed / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"never unpickled")
    for command in ("generate", "bench"):  # bench checks the folder before starting its worker groups
        assert "pickled weights (.bin) only for unet" in one_line_error(
            monkeypatch, capsys, command, "--pipeline", mixed, "--prompts", prompts, "--out", tmp_path / "m")
    assert not (tmp_path / "m").exists()
    for case, hint in (("flux", "lacks components its pipeline class needs"),  # saved without text encoders
                       ("user-pipeline", "MyPipeline is not a diffusers class")):
        build(case)[0].save_pretrained(tmp_path / case)
        assert hint in one_line_error(monkeypatch, capsys, "generate", "--pipeline", tmp_path / case,
                                      "--prompts", prompts)
    assert "cannot read the prompt file" in one_line_error(
        monkeypatch, capsys, "generate", "--pipeline", folder, "--prompts", tmp_path / "missing.txt")
    for command in ("generate", "search", "bench", "plan make fora"):  # --sampler had been ignored without a word
        assert "--sampler applies to the shipped models" in one_line_error(
            monkeypatch, capsys, *command.split(), "--pipeline", folder, "--prompts", prompts, "--sampler", "dpm",
            "--out", tmp_path / "s")
    assert not (tmp_path / "s").exists()
    (tmp_path / "blank.txt").write_text("\n# nothing\n")
    assert "holds no prompt" in one_line_error(
        monkeypatch, capsys, "search", "--pipeline", folder, "--prompts", tmp_path / "blank.txt")
    (tmp_path / "broken.txt").write_text("{\"prompt\": \n")
    assert "line 1: not valid JSON" in one_line_error(
        monkeypatch, capsys, "quantize", "--pipeline", folder, "--prompts", tmp_path / "broken.txt")
    refused = {"prompt": "a red circle", "callback_on_step_end_tensor_inputs": ["nope"]}  # the pipeline's own check
    (tmp_path / "odd.txt").write_text(json.dumps(refused) + "\n")
    assert "StableDiffusionPipeline failed on the call for a red circle" in one_line_error(
        monkeypatch, capsys, "generate", "--pipeline", folder, "--prompts", tmp_path / "odd.txt", "--steps", "2")
    (tmp_path / "typed.txt").write_text(json.dumps({"prompt": "a red circle", "guidance_scale": "high"}) + "\n")
    assert "failed on the call for a red circle" in one_line_error(
        monkeypatch, capsys, "generate", "--pipeline", folder, "--prompts", tmp_path / "typed.txt", "--steps", "2")
    assert "--pipeline needs --prompts" in one_line_error(monkeypatch, capsys, "generate", "--pipeline", folder)
    assert "--classes is for the class-label models" in one_line_error(
        monkeypatch, capsys, "generate", "--pipeline", folder, "--prompts", prompts, "--classes", "circle")


def test_more_bad_input_is_one_line_and_leaves_nothing_behind(monkeypatch, capsys, sd_folder, tmp_path):
    folder, prompts = sd_folder
    assert "the pipeline folder" in one_line_error(
        monkeypatch, capsys, "generate", "--pipeline", tmp_path / "nowhere", "--prompts", prompts)
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial, ignore=shutil.ignore_patterns("unet"))
    assert f"lists the component unet (UNet2DConditionModel), but the folder {partial / 'unet'} is missing" in \
        one_line_error(monkeypatch, capsys, "generate", "--pipeline", partial, "--prompts", prompts)
    (tmp_path / "steps.txt").write_text(json.dumps({"prompt": "a red circle", "num_inference_steps": "four"}) + "\n")
    assert "line 1: num_inference_steps must be a whole number >= 1, got 'four'" in one_line_error(
        monkeypatch, capsys, "quantize", "--pipeline", folder, "--prompts", tmp_path / "steps.txt",
        "--out", tmp_path / "quant")
    (tmp_path / "scale.txt").write_text(json.dumps({"prompt": "a red circle", "guidance_scale": "high"}) + "\n")
    assert "failed on the call for a red circle" in one_line_error(  # in the quantization's calibration too
        monkeypatch, capsys, "quantize", "--pipeline", folder, "--prompts", tmp_path / "scale.txt",
        "--out", tmp_path / "quant")
    code, _, err = run_cli(monkeypatch, capsys, "search", "--pipeline", folder, "--prompts", prompts, "--storage",
                           "bogus://x", "--out", tmp_path / "search", "--calib-per-class", "1",
                           "--heldout-per-class", "1")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: cannot open the search storage bogus://x")
    assert not (tmp_path / "quant").exists() and not (tmp_path / "search").exists()  # no empty folders left
    (tmp_path / "plans").mkdir()
    assert "is a directory (give a file name" in one_line_error(
        monkeypatch, capsys, "plan", "make", "fora", "--model", "dit", "--out", tmp_path / "plans")
    assert not list(tmp_path.glob("plans*.tmp")) and not any((tmp_path / "plans").iterdir())
    bottleneck = tmp_path / "bottleneck.json"  # valid as a file, refused on a U-Net when it runs
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    identity_plan(unet).model_copy(update={"solver": SolverSpec(name="ddim", steps=4, bottleneck=(1, 2, 1))}).save(
        bottleneck)
    assert "does not support it" in one_line_error(
        monkeypatch, capsys, "generate", "--pipeline", folder, "--prompts", prompts, "--plan", bottleneck,
        "--save-plan", tmp_path / "saved.json", "--out", tmp_path / "refused")
    assert not (tmp_path / "saved.json").exists()  # only a plan that ran is saved


def test_a_prompt_files_own_steps_and_misspelt_arguments(monkeypatch, capsys, sd_folder, tmp_path):
    folder, _ = sd_folder
    own = tmp_path / "own.txt"
    own.write_text(json.dumps({"prompt": "a red circle", "num_inference_steps": 3}) + "\n")
    ok(monkeypatch, capsys, "generate", "--pipeline", folder, "--prompts", own, "--per-class", "1", "--method",
       "fora", "--interval", "2", "--save-plan", tmp_path / "plan.json", "--out", tmp_path / "g")
    assert Plan.load(tmp_path / "plan.json").num_steps == 4  # made for the file's 3 PNDM steps, not for 50
    code, _, err = run_cli(monkeypatch, capsys, "plan", "make", "fora", "--pipeline", folder, "--prompts", own,
                           "--steps", "8", "--out", tmp_path / "made.json")
    assert code == 0 and "num_inference_steps 3 on every line, which wins over --steps 8" in err
    assert Plan.load(tmp_path / "made.json").num_steps == 4
    ok(monkeypatch, capsys, "plan", "make", "fora", "--pipeline", folder, "--steps", "6", "--out",
       tmp_path / "static.json")  # a static method needs no prompts
    assert Plan.load(tmp_path / "static.json").num_steps == 7
    typo = tmp_path / "typo.txt"
    typo.write_text(json.dumps({"prompt": "a red circle", "guidance": 7.5}) + "\n")
    assert "call 0 sets 'guidance', which StableDiffusionPipeline does not take (did you mean 'guidance_scale'?)" \
        in one_line_error(monkeypatch, capsys, "generate", "--pipeline", folder, "--prompts", typo)
    listed = tmp_path / "list.txt"
    listed.write_text("[1, 2]\n[style] a red circle\n")  # a JSON list is no prompt; a bracketed prompt is
    assert "line 1: a JSON line must be an object of pipeline arguments" in one_line_error(
        monkeypatch, capsys, "generate", "--pipeline", folder, "--prompts", listed)


def test_bench_on_a_pipeline_folder(monkeypatch, capsys, sd_folder, tmp_path):
    """Our methods and the step baselines on a stock SD pipeline folder (the peers: next test)."""
    folder, prompts = sd_folder
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"fora": [{"interval": 2}], "keysteps": [{"keys": 2}], "steps-ddim": [{"steps": 2}]}))
    out = ok(monkeypatch, capsys, "bench", "--pipeline", folder, "--prompts", prompts, "--quick", "--steps", "4",
             "--guidance", "5", "--per-class", "1", "--sweep", sweep, "--out", tmp_path / "bench")
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert set(rows) == {"fora", "keysteps", "steps-ddim"} and results["model"] == "sd" and not results["skipped"]
    assert rows["fora"]["speedup_macs"] > 1 and rows["fora"]["accuracy"] is None and rows["fora"]["psnr"] > 0
    assert rows["steps-ddim"]["speedup_macs"] > 2  # 2 DDIM steps against 5 PNDM evaluations
    assert "speedup at PSNR" in out and (tmp_path / "bench" / "report.html").is_file()


def test_sd_peers_in_their_natural_form_on_a_stock_pipeline(sd_folder, tmp_path):
    """DeepCache's helper, ToMe and T-GATE's SD loader on the stock SD pipeline (in-process)."""
    from diffaccel.bench.config import BenchConfig, BenchJob, items
    from diffaccel.bench.peers import PEERS
    from diffaccel.bench.worker import run_group

    missing = [n for n in ("deepcache-sdhelper", "tomesd", "tgate") if PEERS[n].available()]
    if missing:
        pytest.skip(f"peers not installed: {', '.join(missing)} (pip install 'diffaccel[peers]')")
    folder, prompts = sd_folder
    cfg = BenchConfig(pipeline=str(folder), prompts=str(prompts), per_class=1, batch_size=1, steps=4,
                      guidance=5.0).resolved()
    data = items(cfg)
    entries = [{"name": "deepcache-sdhelper", "settings": {"interval": 2}}, {"name": "tomesd", "settings": {}},
               {"name": "tgate", "settings": {"gate_step": 2, "sp_interval": 1, "warm_up": 0}}]
    job = BenchJob(group="sd-peers", family="peer", entries=entries,
                   target={"pipeline": str(folder), "prompts": str(prompts)}, steps=4, guidance=5.0, threads=1,
                   calls=data["calls"], calib_calls=data["calib_calls"], classes=None, grid_dir=str(tmp_path),
                   grid_rows=data["grid_rows"], grid_per_row=1)
    result = run_group(job)
    assert result["skipped"] == [], result["skipped"]
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["deepcache-sdhelper"]["speedup_macs"] > 1.1 and rows["tgate"]["speedup_macs"] > 1.1
    assert all(0 < r["psnr"] < 100 and r["accuracy"] is None for r in rows.values())


def test_embedded_set_up_on_other_weights_is_refused_not_run(monkeypatch, capsys, tmp_path):
    """A DiT of ten classes loaded with --weights: the shapes evaluator reads six, so scoring it would
    be meaningless; the command says to run it as a pipeline folder instead."""
    from diffaccel.zoo.models import build_dit

    torch.manual_seed(0)
    build_dit(num_embeds_ada_norm=10, num_layers=2).save_pretrained(tmp_path / "weights" / "transformer")
    line = one_line_error(monkeypatch, capsys, "generate", "--model", "dit", "--weights", tmp_path / "weights",
                          "--per-class", "1", "--steps", "2", "--out", tmp_path / "out")
    assert "10 classes" in line and "--pipeline" in line and not (tmp_path / "out" / "record.json").exists()


def test_flow_matching_folders_get_their_flow_samplers_from_the_command_line(monkeypatch, capsys, tmp_path):
    """SD3 and Flux folders (tiny, random, with text encoders): the bench's fewer-step rows run their
    flow samplers (UniPC, DPM-Solver++ and the pipeline's own Euler at fewer steps; no EVODiff), and a
    plan file with a solver section runs through `generate`, its own step count."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "height": 16, "width": 16, "max_sequence_length": 16})
                                 for p in ("a red circle on a blue background", "a small green square")) + "\n")
    for name, pipe in flow_with_text_encoders().items():
        pipe.save_pretrained(tmp_path / name)
        out = tmp_path / f"bench-{name}"
        ok(monkeypatch, capsys, "bench", "--pipeline", tmp_path / name, "--prompts", prompts, "--quick", "--steps",
           "12", "--per-class", "1", "--no-peers", "--only", "steps-unipc,steps-ddim", "--threads", "1",
           "--out", out)
        rows = json.loads((out / "results.json").read_text())["rows"]
        assert {r["name"] for r in rows} == {"steps-unipc", "steps-ddim"}
        assert all(r["speedup_macs"] > 1 and r["psnr"] > 0 for r in rows)
        plan = identity_plan(pipe.transformer).model_copy(update={"solver": SolverSpec(name="dpm++2", steps=5)})
        plan.save(tmp_path / f"{name}-plan.json")
        ok(monkeypatch, capsys, "generate", "--pipeline", tmp_path / name, "--prompts", prompts, "--plan",
           tmp_path / f"{name}-plan.json", "--compare", "--threads", "1", "--out", tmp_path / f"gen-{name}")
        record = json.loads((tmp_path / f"gen-{name}" / "record.json").read_text())
        assert record["speedup_macs"] > 1 and record["psnr"] > 0 and record["plan"]["solver"]["name"] == "dpm++2"


def test_a_prompt_file_with_a_byte_order_mark_reads_its_first_line_as_json(tmp_path):
    from diffaccel.targets import read_prompts

    path = tmp_path / "prompts.jsonl"  # as Windows Notepad saves UTF-8
    path.write_bytes('{"prompt": "a small red circle", "seed": 3}\n# a comment\nplain words\n'.encode("utf-8-sig"))
    # the first line had been taken for a literal prompt, its seed dropped
    assert read_prompts(path) == [{"prompt": "a small red circle", "seed": 3}, {"prompt": "plain words"}]


def test_bench_counts_the_images_of_calls_that_draw_several(monkeypatch, capsys, sd_folder, tmp_path):
    """num_images_per_prompt 2 with fewer timed pairs than calls: the untimed calls' baseline images had been
    sliced one per call, and every row after the first group skipped ("returned 2 images for 1 labels")."""
    folder, _ = sd_folder
    prompts = tmp_path / "two.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "num_images_per_prompt": 2}) + "\n"
                               for p in ("a red circle", "a small green square")))
    ok(monkeypatch, capsys, "bench", "--pipeline", folder, "--prompts", prompts, "--quick", "--per-class", "2",
       "--steps", "4", "--no-peers", "--only", "fora,steps-ddim", "--timed-pairs", "1", "--threads", "1",
       "--out", tmp_path / "b")
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert results["samples"]["n_images"] == 8 and not results["skipped"]
    assert {row["n_images"] for row in results["rows"]} == {8}


def test_prompt_lines_of_different_cost_are_counted_each_at_its_own(monkeypatch, capsys, sd_folder, tmp_path):
    """The first line's MACs per image had stood for every line: 18.1 M for a file averaging 67.9 M."""
    folder, _ = sd_folder
    lines = {"cheap": {"prompt": "a red circle", "num_inference_steps": 2, "guidance_scale": 1.0},
             "dear": {"prompt": "a blue circle", "num_inference_steps": 6, "guidance_scale": 7.5,
                      "num_images_per_prompt": 3}}
    records = {}
    for name, chosen in (("cheap", ["cheap"]), ("dear", ["dear"]), ("both", ["cheap", "dear"])):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(lines[k]) for k in chosen) + "\n")
        ok(monkeypatch, capsys, "generate", "--pipeline", folder, "--prompts", tmp_path / f"{name}.jsonl",
           "--threads", "1", "--out", tmp_path / name)
        records[name] = json.loads((tmp_path / name / "record.json").read_text())
    weighted = sum(records[k]["macs_per_image"] * records[k]["n_images"] for k in ("cheap", "dear"))
    assert records["both"]["macs_per_image"] == pytest.approx(weighted / records["both"]["n_images"], rel=1e-3)


def test_bench_runs_at_the_step_count_every_prompt_line_sets(monkeypatch, capsys, sd_folder, tmp_path):
    """Every line sets 3 steps; the bench had run 50, skipped every plan as made for 50 steps, and timed
    its fewer-step baselines at more steps than the lines' own."""
    folder, _ = sd_folder
    three = tmp_path / "three.jsonl"
    three.write_text(json.dumps({"prompt": "a red circle", "num_inference_steps": 3}) + "\n")
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"fora": [{"interval": 2}]}))
    ok(monkeypatch, capsys, "bench", "--pipeline", folder, "--prompts", three, "--quick", "--per-class", "1",
       "--no-peers", "--sweep", sweep, "--threads", "1", "--out", tmp_path / "b")
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert results["baseline"]["steps"] == 3 and [r["name"] for r in results["rows"]] == ["fora"]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(three.read_text() + json.dumps({"prompt": "a blue circle", "num_inference_steps": 4}) + "\n")
    assert "different num_inference_steps" in one_line_error(
        monkeypatch, capsys, "bench", "--pipeline", folder, "--prompts", mixed, "--out", tmp_path / "m")
    sizes = tmp_path / "sizes.jsonl"
    sizes.write_text(three.read_text() + json.dumps({"prompt": "a blue circle", "num_inference_steps": 3,
                                                     "height": 32, "width": 24}) + "\n")
    assert "images of different sizes" in one_line_error(
        monkeypatch, capsys, "bench", "--pipeline", folder, "--prompts", sizes, "--out", tmp_path / "s")
    assert not (tmp_path / "s").exists()
    two_sizes = tmp_path / "two_sizes.jsonl"  # generate refuses them before sampling too (it did after)
    two_sizes.write_text("".join(json.dumps({"prompt": "a red circle", "num_inference_steps": 3, "height": 32,
                                             "width": width}) + "\n" for width in (32, 24)))
    assert "prompt lines make images of different sizes" in one_line_error(
        monkeypatch, capsys, "generate", "--pipeline", folder, "--prompts", two_sizes, "--out", tmp_path / "g")
    assert not (tmp_path / "g" / "record.json").exists()
    assert "--threads 100000 is more than" in one_line_error(
        monkeypatch, capsys, "generate", "--model", "dit", "--threads", "100000", "--out", tmp_path / "t")


def test_any_seed_runs_on_a_pipeline_folder_as_on_the_shipped_models(monkeypatch, capsys, sd_folder, tmp_path):
    folder, prompts = sd_folder  # seeds past 2**63 had failed inside torch's generator ("Overflow when unpacking")
    ok(monkeypatch, capsys, "generate", "--pipeline", folder, "--prompts", prompts, "--per-class", "2", "--steps", "2",
       "--seed", str(2**64 - 1), "--threads", "1", "--out", tmp_path / "g")
