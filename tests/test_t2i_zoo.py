"""The text-to-image zoo: captioned data, tokenizer, shipped pipelines, evaluator, resumable training."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

from diffaccel.errors import DiffaccelError, WeightsError
from diffaccel.zoo.t2i import captions, text
from diffaccel.zoo.t2i.evaluator import load_t2i_evaluator
from diffaccel.zoo.t2i.pipelines import generate, load_t2i_pipeline
from diffaccel.zoo.t2i.train import main
from diffaccel.zoo.t2i.vae import build_vae
from diffaccel.zoo.weights import WEIGHTS_DIR

SHIPPED = {name: (WEIGHTS_DIR / name / "model_index.json").exists() for name in ("pixart", "sd")}
SHIPPED_NAMES = [name for name, shipped in SHIPPED.items() if shipped]


def needs(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not SHIPPED[name], reason=f"the {name} pipeline is not shipped yet (training)")


needs_any = pytest.mark.skipif(not SHIPPED_NAMES, reason="no t2i pipeline is shipped yet (training)")

PROMPTS = ["a small red circle on a blue background", "a large white plus on a black background"]


def test_captions_are_deterministic_and_parse_back():
    for attrs in captions.ALL_COMBOS:
        assert captions.parse_caption(captions.caption(attrs)) == attrs
    a, attrs_a = captions.make_batch("val", 12, start=5)
    b, attrs_b = captions.make_batch("val", 12, start=5)
    assert np.array_equal(a, b) and attrs_a == attrs_b
    assert a.shape == (12, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    c, _ = captions.make_batch("val", 12, start=6)
    assert np.array_equal(a[1:], c[:-1])  # an image depends on its item alone, not on the slice
    assert not np.array_equal(a[0], a[1])
    with pytest.raises(ValueError):
        captions.parse_caption("a small red circle on a red background")


def test_prompts_outside_the_caption_language_are_flagged_once_with_the_first_culprit():
    from diffaccel.targets import in_caption_language

    good = {"prompt": captions.caption(captions.ALL_COMBOS[0])}
    assert in_caption_language([good, good])
    with pytest.warns(UserWarning, match=r"prompt 2 is outside .*'a fluffy cat'.*adherence is not scored") as caught:
        assert not in_caption_language([good, {"prompt": "a fluffy cat"}, {"prompt": "a dog"}])
    assert len(caught) == 1  # had run with no word, adherence silently left out
    with pytest.warns(UserWarning, match="prompt 1 is outside"):
        assert not in_caption_language([{"prompt_embeds": "given"}])


def test_splits_are_disjoint_and_hold_out_prompts_from_training():
    seeds = {split: {s for _, s in captions.items(split, 3000)} for split in captions.SPLITS}
    splits = list(seeds)
    for i, first in enumerate(splits):
        for second in splits[i + 1:]:
            assert not seeds[first] & seeds[second]
    held_out = set(captions.HELD_OUT_COMBOS)
    assert len(held_out) == 36 and len(captions.ALL_COMBOS) == 360
    train = [a for a, _ in captions.items("train", 3000)]
    assert not held_out & set(train)
    assert held_out & {a for a, _ in captions.items("train", 3000, include_held_out=True)}
    evaluation = [a for a, _ in captions.items("eval", 720)]
    assert all(count == 2 for count in np.unique([captions.ALL_COMBOS.index(a) for a in evaluation],
                                                 return_counts=True)[1])
    assert set(captions.held_out_prompts()) == {captions.caption(a) for a in held_out}


@needs_any
def test_tokenizer_round_trip_offline(tmp_path):
    tokenizer = text.build_tokenizer()
    text.save_tokenizer(tokenizer, tmp_path)
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path, local_files_only=True)
    ids = reloaded(PROMPTS[0]).input_ids
    assert len(ids) == 10 and ids[0] == reloaded.bos_token_id and ids[-1] == reloaded.eos_token_id
    assert reloaded.decode(ids, skip_special_tokens=True) == PROMPTS[0]
    assert ids == tokenizer(PROMPTS[0]).input_ids
    assert reloaded("").input_ids == [reloaded.bos_token_id, reloaded.eos_token_id]
    assert reloaded("a purple circle").input_ids[2] == reloaded.unk_token_id
    padded, mask = text.tokenize(reloaded, PROMPTS)
    assert padded.shape == (2, text.MAX_LENGTH) and mask.sum(1).tolist() == [10, 10]
    for name in SHIPPED_NAMES:  # the shipped tokenizers are the one our code writes
        shipped = PreTrainedTokenizerFast.from_pretrained(WEIGHTS_DIR / name / "tokenizer", local_files_only=True)
        assert shipped.get_vocab() == tokenizer.get_vocab() and shipped.model_max_length == text.MAX_LENGTH


@pytest.mark.parametrize("name, cls", [pytest.param("pixart", PixArtAlphaPipeline, marks=needs("pixart")),
                                       pytest.param("sd", StableDiffusionPipeline, marks=needs("sd"))])
def test_shipped_pipelines_load_with_stock_classes_and_are_deterministic(monkeypatch, name, cls):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stock = cls.from_pretrained(WEIGHTS_DIR / name, local_files_only=True)
    assert stock.vae.config.latent_channels == 4 and stock.vae.config.scaling_factor != 1.0
    pipe = load_t2i_pipeline(name)
    assert type(pipe) is cls and pipe.text_encoder.dtype == torch.float32
    first = generate(pipe, PROMPTS, [3, 4], steps=4, guidance=4.0)
    again = generate(pipe, PROMPTS, [3, 4], steps=4, guidance=4.0)
    other = generate(pipe, PROMPTS, [5, 4], steps=4, guidance=4.0)
    assert first.shape == (2, 3, 64, 64) and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)
    assert not torch.equal(first[0], other[0]) and torch.allclose(first[1], other[1], atol=1e-4)
    assert type(load_t2i_pipeline(name, "dpm").scheduler).__name__ == "DPMSolverMultistepScheduler"


@needs("pixart")
def test_pixart_prompt_embedding_does_not_depend_on_the_padded_length():
    pipe = load_t2i_pipeline("pixart")
    seeds = [torch.Generator().manual_seed(1)]
    short = pipe(prompt=PROMPTS[:1], num_inference_steps=2, guidance_scale=3.0, generator=seeds, output_type="pt",
                 use_resolution_binning=False, clean_caption=False, max_sequence_length=text.MAX_LENGTH).images
    seeds = [torch.Generator().manual_seed(1)]
    default = pipe(prompt=PROMPTS[:1], num_inference_steps=2, guidance_scale=3.0, generator=seeds, output_type="pt",
                   use_resolution_binning=False, clean_caption=False).images  # 120 tokens
    assert torch.allclose(short, default, atol=1e-5)


def test_evaluator_reads_real_images_and_rejects_wrong_prompts():
    evaluator = load_t2i_evaluator()
    images = evaluator.real_images(120)
    attrs = [a for a, _ in captions.items("eval", 120)]
    scores = evaluator.attribute_scores(images, [captions.caption(a) for a in attrs])
    assert scores["adherence"] >= 0.95, scores
    shifted = attrs[1:] + attrs[:1]  # every image scored against another item's prompt
    assert evaluator.adherence(images, shifted) < 0.1
    right = evaluator.correct(images, shifted)
    assert right.shape == (120, 4) and float(right.all(1).float().mean()) == evaluator.adherence(images, shifted)
    real = evaluator.real_images(300)
    floor = evaluator.frechet_distance(evaluator.real_images(300, start=300), real)
    noise = torch.rand(300, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert evaluator.frechet_distance(noise, real) > 20 * floor


@needs_any
def test_missing_or_corrupt_folders_raise_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="model_index.json"):
        load_t2i_pipeline("sd", weights_dir=tmp_path / "nowhere")
    name = SHIPPED_NAMES[0]
    folder = tmp_path / name
    shutil.copytree(WEIGHTS_DIR / name, folder)
    weights = next((folder / {"pixart": "transformer", "sd": "unet"}[name]).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="corrupt"):
        load_t2i_pipeline(name, weights_dir=folder)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(WeightsError, match="text_encoder"):
        load_t2i_pipeline(name, weights_dir=folder)
    (folder / "text_encoder").mkdir()  # pickled weights are named as such (it had said the files were missing)
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(WeightsError, match=r"pickled weights \(.bin\) only for text_encoder"):
        load_t2i_pipeline(name, weights_dir=folder)
    with pytest.raises(WeightsError):
        load_t2i_evaluator(tmp_path / "nowhere")


def _tiny_run(tmp_path, name: str, vae_dir, extra: list[str]) -> dict:
    tiny = {"pixart": '{"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1, '
                      '"cross_attention_dim": 32}',
            "sd": '{"block_out_channels": [16, 16, 32]}'}
    argv = ["--model", name, "--out", str(tmp_path / name), "--steps", "4", "--batch", "4", "--warmup", "2",
            "--checkpoint-every", "2", "--vae", str(vae_dir), "--latents", str(tmp_path / "latents.safetensors"),
            "--cache-items", "12", "--text-overrides", '{"hidden_size": 32, "num_hidden_layers": 1, '
            '"intermediate_size": 64, "num_attention_heads": 2}', "--overrides", tiny[name]]
    main(argv + extra)
    return load_file(str(tmp_path / name / "checkpoint.safetensors"))


def test_tiny_training_resumes_to_the_same_weights(tmp_path):
    torch.manual_seed(0)
    vae = build_vae(block_out_channels=(8, 8, 8), norm_num_groups=4)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    for name in ("pixart", "sd"):
        whole = _tiny_run(tmp_path / "whole", name, tmp_path / "vae", [])
        _tiny_run(tmp_path / "split", name, tmp_path / "vae", ["--stop-after", "2"])
        with pytest.raises(DiffaccelError, match="--resume"):
            _tiny_run(tmp_path / "split", name, tmp_path / "vae", [])
        main(["--out", str(tmp_path / "split" / name), "--resume"])
        split = load_file(str(tmp_path / "split" / name / "checkpoint.safetensors"))
        assert whole.keys() == split.keys()
        assert all(torch.equal(whole[k], split[k]) for k in whole), name
        saved = json.loads((tmp_path / "split" / name / "train_config.json").read_text())
        assert saved["steps"] == 4 and saved["stop_after"] == 0


@pytest.mark.parametrize("name", ["pixart", "sd"])
def test_cli_runs_a_t2i_model_by_name_and_scores_prompt_adherence(monkeypatch, capsys, tmp_path, name):
    from conftest import run_cli

    torch.manual_seed(0)
    build_vae(block_out_channels=(8, 8, 8), norm_num_groups=4).save_pretrained(tmp_path / "vae",
                                                                                safe_serialization=True)
    _tiny_run(tmp_path, name, tmp_path / "vae", ["--export", str(tmp_path / "export")])
    common = ("--model", name, "--weights", tmp_path / "export", "--per-class", "1", "--steps", "4")
    code, stdout, err = run_cli(monkeypatch, capsys, "generate", *common, "--method", "fora", "--interval", "2",
                                "--compare", "--out", tmp_path / "gen")
    assert code == 0, err
    record = json.loads((tmp_path / "gen" / "record.json").read_text())
    assert record["model"] == name and record["n_images"] == 12 and len(record["prompts"]) == 12
    assert all(captions.parse_caption(p) for p in record["prompts"])  # held-out captions by default
    assert 0 <= record["adherence"] <= record["accuracy_shape"] == record["accuracy"] <= 1
    scored = {k for k in record if k in ("adherence", "fd", "fd_floor") or k.startswith("accuracy")}
    assert {"adherence", "accuracy", "accuracy_colour", "fd", "fd_floor"} <= scored <= record["baseline"].keys()
    assert record["speedup_macs"] > 1
    assert "adherence" in stdout
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle on a blue background\na purple cloud\n")
    code, _, err = run_cli(monkeypatch, capsys, "generate", *common, "--prompts", prompts, "--out", tmp_path / "own")
    assert code == 0, err
    own = json.loads((tmp_path / "own" / "record.json").read_text())
    assert own["n_images"] == 2 and "adherence" not in own  # a prompt outside the caption language: no score
    code, stdout, err = run_cli(monkeypatch, capsys, "bench", *common[:4], "--quick", "--only", "fora", "--no-peers",
                                "--steps", "4", "--out", tmp_path / "bench")
    assert code == 0, err
    prompts_used = [json.loads(line) for line in (tmp_path / "bench" / "prompts.jsonl").read_text().splitlines()]
    assert [c["prompt"] for c in prompts_used] == record["prompts"]  # the same held-out captions as generate
    bench = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert any(row["name"] == "fora" for row in bench["rows"]) and bench["model"] == "export"
    assert 0 <= bench["baseline"]["adherence"] <= 1 and all(0 <= row["adherence"] <= 1 for row in bench["rows"])
    for row in bench["rows"]:  # both scores paired with the baseline's images of the same prompts and seeds
        for metric in ("accuracy", "adherence"):
            assert row["paired"][metric]["change"] == pytest.approx(row[metric] - bench["baseline"][metric], abs=1e-6)
    assert "adherence" in (tmp_path / "bench" / "results.md").read_text()
    if not SHIPPED[name]:
        code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", name, "--out", tmp_path / "none")
        assert code == 2 and "not shipped" in err and f"--model {name}" in err


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs(n)) for n in ("pixart", "sd")])
def test_the_shipped_pipeline_runs_by_name_and_follows_its_prompts(monkeypatch, capsys, tmp_path, name):
    from conftest import run_cli

    code, stdout, err = run_cli(monkeypatch, capsys, "generate", "--model", name, "--per-class", "1", "--steps", "20",
                                "--guidance", "4", "--out", tmp_path / "gen")
    assert code == 0, err
    record = json.loads((tmp_path / "gen" / "record.json").read_text())
    assert record["weights"] == "shipped" and record["n_images"] == 12
    # A trained model follows its prompts (the shipped SD: 9 of these 12 at 20 steps, 94% of 720 images at 50);
    # all four attributes right by chance is 1/6 x 1/6 x 1/5 x 1/2, about 0.3%. The margin absorbs another CPU.
    assert record["adherence"] >= 0.5, record


@needs_any
def test_fd_is_measured_against_real_images_of_the_prompts_captions():
    """FD had compared the 12 held-out captions' images with all 360 combinations (25-31 against a floor near 1)."""
    from diffaccel.targets import t2i_default_calls

    prompts = [call["prompt"] for call in t2i_default_calls()] * 2
    real = captions.make_batch_of([captions.parse_caption(p) for p in prompts], split="val")
    scores = load_t2i_evaluator().score(torch.from_numpy(real).add(1).div(2), prompts)
    assert scores["adherence"] > 0.9 and scores["fd"] < 3 * scores["fd_floor"], scores


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A tiny VAE and a 4-step SD run on its latents, copied by the tests that change them."""
    root = tmp_path_factory.mktemp("t2i")
    torch.manual_seed(0)
    build_vae(block_out_channels=(8, 8, 8), norm_num_groups=4).save_pretrained(root / "vae", safe_serialization=True)
    _tiny_run(root, "sd", root / "vae", [])
    return root


def test_t2i_export_replaces_only_an_earlier_export(tiny_sd, tmp_path, monkeypatch, capsys):
    """--export had deleted whatever folder it named: the user's files, the run's own --out (its checkpoint)
    or the --vae folder. Those are refused before any work, an earlier export is replaced. A pipeline whose
    config.json asks for more layers than its files hold had loaded with random layers."""
    from conftest import run_cli

    run = tmp_path / "run"
    shutil.copytree(tiny_sd / "sd", run)
    mine = tmp_path / "mine"
    (mine / "src").mkdir(parents=True)
    (mine / "notes.txt").write_text("important")
    export = ["train", "--out", run, "--export-only", "--threads", "1", "--export"]  # the run's model is read
    for dest, said in ((mine, "not an earlier export"), (run, "--out"), (tmp_path, "--out"),
                       (tiny_sd / "vae", "--vae")):
        code, _, err = run_cli(monkeypatch, capsys, *export, dest)
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err
    assert (mine / "notes.txt").read_text() == "important" and (mine / "src").is_dir()
    assert (run / "checkpoint.safetensors").exists() and (tiny_sd / "vae" / "config.json").exists()
    for _ in range(2):
        code, _, err = run_cli(monkeypatch, capsys, *export, tmp_path / "ex")
        assert code == 0, err
    assert type(load_t2i_pipeline("sd", weights_dir=tmp_path / "ex")).__name__ == "StableDiffusionPipeline"
    config = tmp_path / "ex" / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_hidden_layers": 2}))
    with pytest.raises(WeightsError, match=r"text_encoder do not match its config.json: \d+ tensors missing"):
        load_t2i_pipeline("sd", weights_dir=tmp_path / "ex")


def test_t2i_resume_keeps_its_recipe_and_config_until_training_starts(tiny_sd, tmp_path, monkeypatch, capsys):
    """--resume had trained on a changed --batch/--lr/--seed (or as another --model) and rewritten
    train_config.json, even when it then failed; a --latents file that is no latent cache gave a
    SafetensorError or AttributeError traceback. Without --model, the run's own is used."""
    from safetensors.torch import save_file

    from conftest import run_cli

    run = tmp_path / "run"
    shutil.copytree(tiny_sd / "sd", run)
    before = (run / "train_config.json").read_text()
    resume = ["train", "--out", run, "--resume", "--threads", "1", "--steps", "6"]
    code, _, err = run_cli(monkeypatch, capsys, *resume, "--batch", "2", "--lr", "0.5", "--seed", "9")
    assert code == 2 and "--batch 2 (saved: 4), --lr 0.5 (saved: 0.001), --seed 9 (saved: 0)" in err, err
    code, _, err = run_cli(monkeypatch, capsys, *resume, "--model", "vae")
    assert code == 2 and "--model vae (saved: sd)" in err, err
    (tmp_path / "junk.safetensors").write_text("junk")
    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    for name in ("junk.safetensors", "plain.safetensors"):
        kept = (tmp_path / name).read_bytes()
        code, _, err = run_cli(monkeypatch, capsys, *resume, "--latents", tmp_path / name)
        assert code == 2 and f"{name} is not a latent cache" in err and "Traceback" not in err, err
        assert (tmp_path / name).read_bytes() == kept
    assert (run / "train_config.json").read_text() == before
    code, _, err = run_cli(monkeypatch, capsys, *resume[:-1], "5")
    assert code == 0, err
    assert json.loads((run / "train_config.json").read_text())["steps"] == 5


@pytest.mark.parametrize("model, option, value, said", [
    ("vae", "--overrides", '{"channels": 8}', "channels is not a setting of AutoencoderKL"),
    ("pixart", "--overrides", '{"num_layer": 1}', "did you mean num_layers?"),
    ("sd", "--overrides", '{"block_out_channel": [8]}', "did you mean block_out_channels?"),
    ("t2i_evaluator", "--overrides", '{"widht": 8}', "did you mean width?"),
    ("sd", "--text-overrides", '{"hidden_sise": 8}', "is not a setting of CLIPTextConfig"),
    ("sd", "--vae", "no_vae_here", "is not an exported VAE"),
])
def test_t2i_settings_are_checked_before_any_folder_is_made(tmp_path, monkeypatch, capsys, model, option, value,
                                                            said):
    """A misspelled override had crashed with a TypeError after making --out; a denoiser without a trained VAE
    had said it could not reach huggingface.co."""
    from conftest import run_cli

    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "train", "--model", model, "--out", "run", option, value)
    assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    if option == "--vae":
        assert "diffaccel train --model vae --out runs/t2i/vae --export no_vae_here" in err


@needs("sd")
def test_the_vae_recipe_defaults_are_those_of_the_shipped_vae():
    """The docs' command (no --steps) had trained 2400 steps where the shipped VAE records 3000."""
    from diffaccel.zoo.t2i.train import TrainConfig

    shipped = json.loads((WEIGHTS_DIR / "sd" / "vae" / "training.json").read_text())["config"]
    default = vars(TrainConfig.for_model("vae"))
    assert {k: default[k] for k in ("steps", "batch", "lr", "warmup", "ema_decay")} == \
        {k: shipped[k] for k in ("steps", "batch", "lr", "warmup", "ema_decay")}
