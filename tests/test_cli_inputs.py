"""Bad input to `diffaccel train` and `diffaccel bench` is refused before any work: one line on
stderr, a non-zero exit code, no traceback and no folder left behind."""

from __future__ import annotations

import pytest

from conftest import run_cli

TRAIN_MODELS = ("dit", "unet", "evaluator", "vae", "t2i_evaluator", "pixart", "sd", "dlm")


def refused(monkeypatch, capsys, *args) -> str:
    """Run the CLI; assert it failed with exit code 2 and one error line; return that line."""
    code, _, err = run_cli(monkeypatch, capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "Traceback" not in err
    return lines[0]


def test_train_refuses_an_unknown_model_and_names_every_model(monkeypatch, capsys, tmp_path):
    out = tmp_path / "runs" / "x"
    for model_args in (("--model", "nosuch"), ("--model=nosuch",)):
        line = refused(monkeypatch, capsys, "train", *model_args, "--steps", "2", "--out", out)
        assert "unknown model 'nosuch'" in line and all(m in line for m in TRAIN_MODELS), line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("model", ["dit", "evaluator", "pixart", "dlm"])
def test_train_refuses_a_file_where_the_output_folder_should_be(monkeypatch, capsys, tmp_path, model):
    existing = tmp_path / "taken"
    existing.write_text("a file")
    for out in (existing, existing / "run"):
        line = refused(monkeypatch, capsys, "train", "--model", model, "--steps", "2", "--batch", "4", "--out", out)
        assert "a file stands where the output folder should be" in line and "--out" in line, line
    line = refused(monkeypatch, capsys, "train", "--model", model, "--steps", "2", "--out", tmp_path / "run",
                   "--export", existing)
    assert "--export" in line and not (tmp_path / "run").exists()
    assert existing.read_text() == "a file"


@pytest.mark.parametrize("model,option,value,fragment", [
    ("dit", "--steps", "0", "--steps must be >= 1, got 0"),
    ("dit", "--steps", "-1", "--steps must be >= 1, got -1"),
    ("unet", "--batch", "0", "--batch must be >= 1"),
    ("dit", "--lr", "0", "--lr must be > 0"),
    ("dit", "--lr", "nan", "--lr must be a finite number"),
    ("unet", "--label-dropout", "1.5", "--label-dropout must be between 0 and 1"),
    ("dit", "--checkpoint-every", "0", "--checkpoint-every must be >= 1"),
    ("dit", "--workers", "-1", "--workers must be >= 0"),
    ("dit", "--threads", "-2", "--threads must be >= 0"),
    ("dit", "--overrides", "[1]", "--overrides must be a JSON object"),
    ("dit", "--device", "tpu", "--device must be cpu or cuda"),
    ("evaluator", "--steps", "0", "--steps must be >= 1"),
    ("evaluator", "--batch", "-4", "--batch must be >= 1"),
    ("vae", "--steps", "0", "--steps must be >= 1"),
    ("vae", "--steps", "-1", "--steps must be >= 1"),
    ("pixart", "--batch", "0", "--batch must be >= 1"),
    ("sd", "--lr", "-0.1", "--lr must be > 0"),
    ("t2i_evaluator", "--ema-decay", "2", "--ema-decay must be between 0 and 1"),
    ("sd", "--cache-items", "0", "--cache-items must be >= 1"),
    ("pixart", "--text-overrides", "{", "--text-overrides must be a JSON object"),
    ("dlm", "--steps", "0", "--steps must be >= 1"),
    ("dlm", "--steps", "-1", "--steps must be >= 1"),
    ("dlm", "--batch", "0", "--batch must be >= 1"),
    ("dlm", "--lr", "inf", "--lr must be a finite number"),
    ("dlm", "--answer-length", "1", "--answer-length must be >= 2"),
    ("dlm", "--block-fraction", "-0.5", "--block-fraction must be between 0 and 1"),
    ("dlm", "--mix", "nope", "--mix must be a JSON object"),
])
def test_train_refuses_numbers_out_of_range_before_any_work(monkeypatch, capsys, tmp_path, model, option, value,
                                                             fragment):
    out = tmp_path / "run"
    line = refused(monkeypatch, capsys, "train", "--model", model, option, value, "--out", out)
    assert fragment in line, line
    assert not out.exists()


def test_train_help_names_the_models_and_how_to_see_a_recipes_options(monkeypatch, capsys):
    code, stdout, _ = run_cli(monkeypatch, capsys, "train", "--help")
    assert code == 0 and all(m in stdout for m in TRAIN_MODELS), stdout
    assert "--help-train" in stdout
    for model, option in [("dit", "--label-dropout"), ("vae", "--kl-weight"), ("dlm", "--block-fraction")]:
        code, stdout, _ = run_cli(monkeypatch, capsys, "train", "--model", model, "--help-train")
        assert code == 0 and stdout.startswith("usage: diffaccel train") and option in stdout, stdout
        assert "optimizer steps of the whole run" in stdout and "(default: " in stdout, stdout
    assert "usage: diffaccel train --model dlm" in stdout
    code, stdout, _ = run_cli(monkeypatch, capsys, "train", "--model", "evaluator", "--help-train")
    assert code == 0 and "--model evaluator takes only --steps, --batch, --lr, --seed" in " ".join(stdout.split())


def test_an_unknown_model_error_names_the_language_model_too(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", "foo", "--threads", "1")
    assert code != 0 and "unknown model 'foo'" in err and "dlm" in err


def test_every_recipe_option_has_a_help_string():
    from diffaccel.zoo.t2i.train import _parser as t2i_parser
    from diffaccel.zoo.train import _parser as zoo_parser

    for parser in (zoo_parser(), t2i_parser()):
        assert parser.prog == "diffaccel train"
        assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]


@pytest.mark.parametrize("option,value", [("--per-class", "0"), ("--per-class", "-2"), ("--batch-size", "0"),
                                          ("--threads", "0"), ("--timed-pairs", "0"), ("--group-timeout", "0")])
@pytest.mark.parametrize("model", ["dit", "dlm"])
def test_bench_refuses_numbers_below_their_minimum_before_any_work(monkeypatch, capsys, tmp_path, option, value,
                                                                   model):
    def no_work(*args, **kwargs):
        raise AssertionError("bench started although an option was out of range")

    monkeypatch.setattr("diffaccel.cli.bench.run_bench", no_work)
    monkeypatch.setattr("diffaccel.cli.bench.lm_bench", no_work)
    out = tmp_path / "bench"
    line = refused(monkeypatch, capsys, "bench", "--model", model, "--quick", option, value, "--out", out)
    assert option in line, line
    assert not out.exists()


def test_a_prompt_line_that_makes_no_image_is_refused_when_the_file_is_read(tmp_path):
    """``num_images_per_prompt: 0`` or an empty prompt list had run until torch's reshape error (and
    counted as one image); every command that reads a prompt file now refuses the line."""
    import json

    from diffaccel.calibration.workload import Call, call_images
    from diffaccel.errors import WorkloadError
    from diffaccel.targets import read_prompts

    for line, message in (({"prompt": "a", "num_images_per_prompt": 0}, "num_images_per_prompt must be a whole"),
                          ({"prompt": "a", "num_images_per_prompt": 1.5}, "num_images_per_prompt must be a whole"),
                          ({"prompt": []}, "empty list")):
        path = tmp_path / "prompts.txt"
        path.write_text("# a comment\n" + json.dumps(line) + "\n")
        with pytest.raises(WorkloadError, match=f"line 2: .*{message}"):
            read_prompts(path)
    assert call_images(Call({"prompt": ["a", "b"], "num_images_per_prompt": 0}, (0,))) == 0
    assert call_images(Call({"prompt": ["a", "b"]}, (0,))) == 2


def test_a_video_pipelines_output_is_told_apart_from_a_broken_one():
    """Calibrated methods on a video pipeline (its output under ``.frames``) said to return images "as
    diffusers pipelines do with output_type='pt'", a fix that does not exist for video."""
    from types import SimpleNamespace

    import torch

    from diffaccel.calibration.workload import images_of
    from diffaccel.errors import WorkloadError

    with pytest.raises(WorkloadError, match="not video frames"):
        images_of(SimpleNamespace(frames=torch.zeros(1, 3, 3, 8, 8)))
    with pytest.raises(WorkloadError, match="output_type='pt'"):
        images_of(SimpleNamespace(images="a caption"))
    assert images_of(SimpleNamespace(images=torch.zeros(2, 3, 8, 8))).shape == (2, 3, 8, 8)
