"""How fast the embedded denoisers (and the SD pipeline's) run under autocast on this machine, and
how far the output moves.

    python benchmarks/precision.py [--threads 1] [--batches 24,48] [--repeats 5] [--models unet,dit,sd]

For each model and batch size (images per call; the forward gets twice as many rows, as under
classifier-free guidance), one denoiser forward at t=500 in float32 and under ``torch.autocast`` to
bfloat16, interleaved (median of ``--repeats``), and the output's relative squared error against
float32. Results: ``benchmarks/results/precision.json``. Whether a plan's precision pays within a
whole sampling run is what the search measures (``search/precision.py``); this is the forward alone.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from diffaccel.eval.io import write_json
from diffaccel.runtime.features.precision import emulated_on_cpu
from diffaccel.zoo.t2i.pipelines import load_t2i_pipeline
from diffaccel.zoo.weights import load_pipeline

ROOT = Path(__file__).resolve().parent.parent


def forward(model: torch.nn.Module, name: str, rows: int) -> tuple:
    """The model, its inputs for ``rows`` rows, and a call of it."""
    size, channels = model.config.sample_size, model.config.in_channels
    x, t = torch.randn(rows, channels, size, size, generator=torch.Generator().manual_seed(0)), torch.full((rows,), 500)
    if name == "dit":
        labels = torch.zeros(rows, dtype=torch.long)
        return lambda: model(x, timestep=t, class_labels=labels).sample
    context = 16 if name == "sd" else 1  # the SD pipeline's prompt tokens, the U-Net's one class token
    tokens = torch.randn(rows, context, model.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    return lambda: model(x, t, encoder_hidden_states=tokens).sample


def seconds(call, dtype: torch.dtype | None) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = call()
    return time.perf_counter() - start, out.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="24,48", help="images per call, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="unet,dit,sd")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        model = (load_t2i_pipeline("sd").unet if name == "sd" else load_pipeline(name).denoiser).eval()
        for batch in (int(b) for b in args.batches.split(",")):
            call = forward(model, name, 2 * batch)
            seconds(call, None), seconds(call, torch.bfloat16)  # warm-up
            plain, low = [], []
            for _ in range(args.repeats):  # interleaved: the machine's drift hits both alike
                plain.append(seconds(call, None))
                low.append(seconds(call, torch.bfloat16))
            ref, out = plain[0][1], low[0][1]
            error = float((out - ref).pow(2).mean() / ref.pow(2).mean())
            row = {"model": name, "images_per_call": batch, "float32_ms": 1000 * statistics.median(s for s, _ in plain),
                   "bfloat16_ms": 1000 * statistics.median(s for s, _ in low), "relative_squared_error": error}
            row["speedup"] = row["float32_ms"] / row["bfloat16_ms"]
            print(f"{name} {batch} images: float32 {row['float32_ms']:.0f} ms, bfloat16 {row['bfloat16_ms']:.0f} ms "
                  f"({row['speedup']:.2f}x), relative squared error {error:.1e}", flush=True)
            rows.append(row)
    write_json(ROOT / "benchmarks" / "results" / "precision.json", {
        "rows": rows, "threads": args.threads, "machine": platform.machine(), "processor": platform.processor(),
        "bf16_native": not emulated_on_cpu("bfloat16"),
        "torch": torch.__version__,
        "command": f"python benchmarks/precision.py --threads {args.threads} --batches {args.batches} "
                   f"--repeats {args.repeats} --models {args.models}"})


if __name__ == "__main__":
    main()
