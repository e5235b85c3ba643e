"""The same quantized plans on a GPU: W8A8 through ``torch._int_mm`` on CUDA, alone and with caching.

    python benchmarks/gpu_quant.py --model dit [--batch 64] [--device cuda]

Calibrates on the device, then times each plan against the fp32 baseline, interleaved with CUDA
synchronisation (``gpu_train.time_plans``), and prints one JSON row per plan (wall-clock and MAC
speedups, PSNR against fp32). Writes ``OUT/gpu_quant_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from gpu_train import time_plans

PLANS = {
    "dit": [("ptq", {"bits": "w8a8", "backend": "fake"}), ("ptq", {"bits": "w8a8", "backend": "int8"}),
            ("keysteps", {"keys": 14}),
            ("ptq", {"bits": "w8a8", "backend": "int8", "cache": {"method": "keysteps", "keys": 14}})],
    "unet": [("ptq", {"bits": "w8a8", "backend": "int8"}), ("keysteps", {"keys": 10}),
             ("ptq", {"bits": "w8a8", "backend": "int8", "cache": {"method": "keysteps", "keys": 10}})],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(PLANS), required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args()
    rows = time_plans(None, args.model, args.device, batch=args.batch, repeats=args.repeats, plans=PLANS[args.model])
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
              "torch": torch.__version__, "batch": args.batch, "rows": rows}
    (args.out / f"gpu_quant_{args.model}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
