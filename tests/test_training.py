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
