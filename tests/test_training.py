import json

import torch
from diffusers import DDPMScheduler

from diffaccel.zoo import checkpoint, shapes
from diffaccel.zoo.models import SCHEDULER_CONFIG
from diffaccel.zoo.train import Denoiser, TrainConfig, diffusion_loss, export, train

TINY = {
    "dit": json.dumps({"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16}),
    "unet": json.dumps({"block_out_channels": [16, 16, 16]}),
}


def held_out_loss(model: Denoiser, cfg: TrainConfig) -> float:
    images, labels = shapes.make_batch("val", 64)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return diffusion_loss(model.eval(), DDPMScheduler(**SCHEDULER_CONFIG), torch.from_numpy(images),
                              torch.from_numpy(labels), gen, cfg).item()


def load_ema(run, cfg):
    model = Denoiser(cfg.model, json.loads(cfg.overrides))
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint.load(run / "checkpoint.safetensors", model, ema, torch.optim.AdamW(model.parameters()))
    return model


def test_tiny_training_lowers_held_out_loss(tmp_path):
    for kind in ("dit", "unet"):
        cfg = TrainConfig(model=kind, steps=40, batch=32, lr=2e-3, warmup=5, ema_decay=0.0,
                          overrides=TINY[kind])
        torch.manual_seed(cfg.seed)
        before = held_out_loss(Denoiser(kind, json.loads(cfg.overrides)), cfg)
        train(cfg, tmp_path / kind, show_progress=False)
        after = held_out_loss(load_ema(tmp_path / kind, cfg), cfg)
        assert after < 0.9 * before, (kind, before, after)


def test_resumed_training_matches_uninterrupted(tmp_path):
    cfg = TrainConfig(model="dit", steps=6, batch=8, checkpoint_every=3, overrides=TINY["dit"])
    train(cfg, tmp_path / "straight", show_progress=False)
    cfg.steps = 3
    train(cfg, tmp_path / "resumed", show_progress=False)
    cfg.steps = 6
    train(cfg, tmp_path / "resumed", show_progress=False)
    a = load_ema(tmp_path / "straight", cfg).state_dict()
    b = load_ema(tmp_path / "resumed", cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_writes_loadable_diffusers_folder(tmp_path):
    from diffaccel.zoo.weights import load_pipeline

    for kind in ("dit", "unet"):
        cfg = TrainConfig(model=kind, steps=2, batch=4, overrides=TINY[kind])
        train(cfg, tmp_path / kind, show_progress=False)
        export(tmp_path / kind, tmp_path / f"{kind}-weights")
        pipe = load_pipeline(kind, weights_dir=tmp_path / f"{kind}-weights")
        images = pipe([0, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_stop_after_keeps_the_schedule_of_the_full_run(tmp_path):
    cfg = TrainConfig(model="dit", steps=6, batch=8, overrides=TINY["dit"], stop_after=3, checkpoint_every=100)
    assert train(cfg, tmp_path / "stopped", show_progress=False)["step"] == 3
    cfg.stop_after = 0
    train(cfg, tmp_path / "stopped", show_progress=False)
    train(TrainConfig(model="dit", steps=6, batch=8, overrides=TINY["dit"]), tmp_path / "straight", show_progress=False)
    a = load_ema(tmp_path / "stopped", cfg).state_dict()
    b = load_ema(tmp_path / "straight", cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_continues_only_with_the_recipe_it_was_saved_with(tmp_path, monkeypatch, capsys):
    """Rerunning the trainer on a run folder continues its checkpoint: a changed recipe (batch, lr,
    model overrides) once trained on silently and overwrote train_config.json; it is refused by name,
    while more steps are fine. The LM trainer's --resume does the same, and refuses a folder with
    nothing to resume and model overrides that are no model setting."""
    from conftest import run_cli

    dit = ["train", "--model", "dit", "--out", tmp_path / "dit", "--batch", "4", "--overrides", TINY["dit"],
           "--threads", "1"]
    assert run_cli(monkeypatch, capsys, *dit, "--steps", "2")[0] == 0
    assert run_cli(monkeypatch, capsys, *dit, "--steps", "3")[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, *dit[:-4], "--batch", "8", "--overrides", TINY["dit"], "--steps", "4")
    assert code == 2 and "saved with another recipe: --batch 8 (saved: 4)" in err
    assert json.loads((tmp_path / "dit" / "train_config.json").read_text())["batch"] == 4
    tiny_lm = '{"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 16}'
    lm = ["train", "--model", "dlm", "--out", tmp_path / "lm", "--threads", "1", "--eval-every", "0"]
    assert run_cli(monkeypatch, capsys, *lm, "--steps", "2", "--batch", "4", "--lr", "0.005",
                   "--overrides", tiny_lm)[0] == 0
    assert run_cli(monkeypatch, capsys, *lm, "--resume", "--steps", "3")[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, *lm, "--resume", "--steps", "4", "--lr", "0.001")
    assert code == 2 and "--lr 0.001 (saved: 0.005)" in err
    code, _, err = run_cli(monkeypatch, capsys, "train", "--model", "dlm", "--out", tmp_path / "none", "--resume")
    assert code == 2 and "nothing to resume" in err and not (tmp_path / "none").exists()
    code, _, err = run_cli(monkeypatch, capsys, "train", "--model", "dlm", "--out", tmp_path / "x", "--overrides",
                           '{"bogus_key": 1}')
    assert code == 2 and "bogus_key is not a model setting" in err


def test_export_and_evaluator_out_never_overwrite_other_files(tmp_path, monkeypatch, capsys):
    """--export into a folder of other files, the run's own --out or a folder holding it is refused before any
    training, files untouched (the t2i export had deleted such folders); an earlier export is replaced. The
    evaluator refuses the options it would ignore and an --out holding an exported model (it had replaced
    its training.json)."""
    from conftest import run_cli

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("important")
    dit = ["train", "--model", "dit", "--steps", "1", "--batch", "2", "--overrides", TINY["dit"], "--threads", "1"]
    for out, dest, said in ((tmp_path / "a", mine, "not an earlier export"), (tmp_path / "a", tmp_path / "a", "--out"),
                            (tmp_path / "b" / "run", tmp_path / "b", "--out")):
        code, _, err = run_cli(monkeypatch, capsys, *dit, "--out", out, "--export", dest)
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err
        assert not (out / "train_config.json").exists()
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "important"
    for _ in range(2):  # the second replaces the first export
        assert run_cli(monkeypatch, capsys, *dit, "--out", tmp_path / "a", "--export", tmp_path / "ex")[0] == 0
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == ["training.json", "transformer"]

    evaluator = ["train", "--model", "evaluator", "--steps", "1", "--batch", "4", "--threads", "1"]
    code, _, err = run_cli(monkeypatch, capsys, *evaluator, "--out", tmp_path / "ev", "--warmup", "5",
                           "--export", tmp_path / "evx")
    assert code == 2 and "drop --warmup, --export" in err and not (tmp_path / "ev").exists(), err
    before = (tmp_path / "ex" / "training.json").read_text()
    code, _, err = run_cli(monkeypatch, capsys, *evaluator, "--out", tmp_path / "ex")
    assert code == 2 and "holds transformer" in err and (tmp_path / "ex" / "training.json").read_text() == before
    for _ in range(2):  # an earlier evaluator in --out starts over
        assert run_cli(monkeypatch, capsys, *evaluator, "--out", tmp_path / "ev")[0] == 0
    assert json.loads((tmp_path / "ev" / "training.json").read_text())["steps"] == 1


def test_bad_overrides_and_foreign_checkpoints_are_one_line_errors(tmp_path, monkeypatch, capsys):
    """A misspelled --overrides key had crashed with a TypeError after --out was made; a checkpoint.safetensors
    that is not ours, or another model's, with TypeError or RuntimeError tracebacks."""
    from safetensors.torch import save_file

    from conftest import run_cli

    for model, typo, meant in (("dit", "num_layer", "num_layers"), ("unet", "block_out_channel", "block_out_channels")):
        code, _, err = run_cli(monkeypatch, capsys, "train", "--model", model, "--out", tmp_path / model,
                               "--overrides", json.dumps({typo: 2}))
        assert code == 2 and f"{typo} is not a setting" in err and f"did you mean {meant}?" in err, err
        assert not (tmp_path / model).exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({"a": torch.zeros(2)}, str(foreign / "checkpoint.safetensors"))
    code, _, err = run_cli(monkeypatch, capsys, "train", "--model", "dit", "--out", foreign, "--steps", "1")
    assert code == 2 and "checkpoint.safetensors is not a diffaccel training checkpoint" in err, err
    assert sorted(p.name for p in foreign.iterdir()) == ["checkpoint.safetensors"]
    train(TrainConfig(model="dit", steps=1, batch=2, overrides=TINY["dit"]), tmp_path / "dit", show_progress=False)
    (tmp_path / "dit" / "train_config.json").unlink()  # a recipe lost: the checkpoint is another model's
    code, _, err = run_cli(monkeypatch, capsys, "train", "--model", "unet", "--out", tmp_path / "dit", "--steps", "2",
                           "--overrides", TINY["unet"])
    assert code == 2 and "holds the checkpoint of another model" in err and "Traceback" not in err, err


def test_a_rerun_compares_json_settings_by_value_and_never_shortens_the_run(tmp_path, monkeypatch, capsys):
    """'{"num_layers":2}' had been another recipe than '{"num_layers": 2}'; a finished 4-step run rerun with
    --steps 2 had recorded 2 steps in train_config.json. The summary is logged (logging was never set up),
    and --resume without --model on a folder with no t2i or dlm run says to pass --model."""
    import logging

    from conftest import run_cli

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as outside pytest: `diffaccel train` sets up logging itself
    level = root.level
    dit = ["train", "--model", "dit", "--out", tmp_path / "a", "--batch", "2", "--threads", "1"]
    try:
        code, _, err = run_cli(monkeypatch, capsys, *dit, "--steps", "4", "--overrides", '{"num_layers": 1}')
    finally:
        root.setLevel(level)
    assert code == 0 and "last losses:" in err, err
    assert run_cli(monkeypatch, capsys, *dit, "--steps", "4", "--overrides", '{"num_layers":1}')[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, *dit, "--steps", "2", "--overrides", '{"num_layers": 1}')
    assert code == 2 and "has trained 4 steps already" in err, err
    assert json.loads((tmp_path / "a" / "train_config.json").read_text())["steps"] == 4
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", tmp_path / "a", "--resume")
    assert code == 2 and "pass --model" in err, err
