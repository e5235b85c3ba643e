"""Parallel sampling benchmark: 2 processes x 1 thread against 1 process x 1 thread, interleaved.

    python benchmarks/parallel.py [--models dit unet] [--reps 3] [--per-class 2] [--steps 50]

Two processes form one gloo group (``diffaccel.parallel.spawn``) and stay up for the whole run. Each
repetition runs every setting once, in alternating order: the single-process settings on rank 0
alone (rank 1 waits at a barrier, idle), the parallel ones on both ranks. So the 1-process and
2-process runs of a setting are interleaved in the same processes, under the same machine load,
and each speedup is the median over repetitions of the paired ratio.

Settings per model: the unaccelerated pipeline; CFG parallelism; the best caching plan
(``keysteps``, 12 key steps on the DiT, 8 on the U-Net) in one process and under CFG parallelism;
on the DiT, patch parallelism for several warm-up settings. Where same-host exchanges go through
shared memory (``diffaccel.parallel.shm``), the two CFG settings run once more with every exchange
through gloo's sockets, interleaved like the rest: the transport's own share of the speedup. The
capacity probe runs the unaccelerated job on both ranks at once, independently (twice the work, no
exchange): its throughput against one process is the most any 2-process mode could gain on the
machine as loaded then. Quality: PSNR of every output against its single-process counterpart (the
unaccelerated images, or the plan's own), and whether it is bitwise equal. Rows go to
``benchmarks/results/parallel.json`` (``--out``), each with the command that reproduces it.
``benchmarks/gpu_parallel.py`` runs the same table with NCCL on GPUs.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from diffaccel import methods
from diffaccel.eval.fidelity import psnr_per_image
from diffaccel.eval.io import write_json
from diffaccel.parallel import cfg_parallel, current, patch_parallel, shm, spawn
from diffaccel.parallel.exchange import gather_objects
from diffaccel.runtime.executor import Executor
from diffaccel.zoo.weights import load_pipeline

KEYS = {"dit": 12, "unet": 8}  # our best caching plans at 50 steps (docs/benchmarks.md)
WARMUPS = (1, 2, 4, 8, 16)
RESULTS = Path(__file__).resolve().parent / "results"


def settings(model: str, warmups: tuple[int, ...]) -> list[dict]:
    """The settings of one model: name, parallel mode (None: one process), plan, warm-up, reference."""
    plan = f"keysteps {KEYS[model]}"
    rows = [{"name": "unaccelerated", "mode": None, "plan": False, "reference": None},
            {"name": "capacity probe", "mode": "independent", "plan": False, "reference": None},
            {"name": "cfg", "mode": "cfg", "plan": False, "reference": "unaccelerated"},
            {"name": plan, "mode": None, "plan": True, "reference": "unaccelerated"},
            {"name": f"{plan} + cfg", "mode": "cfg", "plan": True, "reference": plan}]
    if shm.usable(current()):  # the same two settings with every exchange through gloo's sockets
        rows += [{**rows[2], "name": "cfg (gloo)", "transport": "gloo"},
                 {**rows[4], "name": f"{plan} + cfg (gloo)", "transport": "gloo"}]
    if model == "dit":
        rows += [{"name": f"patch, warm-up {w}", "mode": "patch", "plan": False, "warmup": w,
                  "reference": "unaccelerated"} for w in warmups]
    return rows


class Job:
    """One model's pipeline, calls and plan on this rank, and how to run a setting."""

    def __init__(self, model: str, args: argparse.Namespace, device: torch.device):
        self.model, self.device, self.group = model, device, current()
        self.pipe = load_pipeline(model).to(device)
        self.calls = list(self.pipe.workload_calls(args.steps, args.guidance, args.per_class, seed=0,
                                                   calibration=False, batch_size=args.batch_size).calls)
        plan = [None]
        if self.group.main:  # calibrated once, on rank 0, and sent to the other ranks
            keys = min(KEYS[model], args.steps)
            plan = [methods.build("keysteps", self.pipe, args.steps, guidance=args.guidance, keys=keys)]
        if self.group.world > 1:
            dist.broadcast_object_list(plan, src=0)
        self.executor = Executor(self.pipe.denoiser, plan[0])  # one executor: its unit costs are measured once

    def sample(self, setting: dict) -> torch.Tensor:
        out = []
        for call in self.calls:
            with torch.no_grad():
                out.append(self.pipe(**call.kwargs, generator=call.generators()).images.float().cpu())
        return torch.cat(out)

    def run(self, setting: dict) -> tuple[float, float, torch.Tensor | None]:
        """Wall-clock seconds on rank 0, the busiest rank's CPU seconds, and the images (on rank 0) of
        one run of ``setting``; every rank calls it."""
        alone = setting["mode"] is None
        if self.group.world > 1:
            dist.barrier()  # start together
        images, seconds, cpu = None, 0.0, 0.0
        if not alone or self.group.main:
            if setting["plan"]:
                self.executor.install(self.pipe.scheduler)
            wrapper = _wrapper(self.pipe, setting)
            if setting.get("transport") == "gloo":
                os.environ["DIFFACCEL_DIST_SHM"] = "0"
            try:
                with wrapper:
                    _synchronize(self.device)
                    start, cpu_start = time.perf_counter(), time.process_time()
                    images = self.sample(setting)
                    _synchronize(self.device)
                    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            finally:
                os.environ.pop("DIFFACCEL_DIST_SHM", None)
                if setting["plan"]:
                    self.executor.remove()
        if self.group.world > 1:
            dist.barrier()  # the idle rank waits here while rank 0 runs a single-process setting
        return seconds, max(gather_objects(cpu, self.group)), images


def _wrapper(pipe, setting: dict):
    if setting["mode"] == "cfg":
        return cfg_parallel(pipe)
    if setting["mode"] == "patch":
        return patch_parallel(pipe, warmup_steps=setting["warmup"])
    return _Nothing()


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Every setting once as a warm-up, then ``reps`` interleaved repetitions; rows on rank 0."""
    job = Job(model, args, device)
    rows = settings(model, tuple(args.warmups))
    images: dict[str, torch.Tensor] = {}
    for setting in rows:  # warm-up: first-call costs (unit MACs, allocator) stay out of the timings
        _, _, images[setting["name"]] = job.run(setting)
    times: dict[str, list[float]] = {s["name"]: [] for s in rows}
    cpu: dict[str, list[float]] = {s["name"]: [] for s in rows}
    for rep in range(args.reps):
        for setting in rows if rep % 2 == 0 else rows[::-1]:  # alternate the order against drift
            seconds, busiest, out = job.run(setting)
            times[setting["name"]].append(seconds)
            cpu[setting["name"]].append(busiest)
            images[setting["name"]] = out
    if not job.group.main:
        return []
    return [row(model, s, times, cpu, images, args, job.group.world) for s in rows]


def row(model: str, setting: dict, times: dict, cpu: dict, images: dict, args: argparse.Namespace,
        world: int) -> dict:
    """One setting's figures: wall-clock speedups (the measure), and the busiest rank's CPU time against
    one process's (how well the work was split, whatever else shares the machine)."""
    name, reference = setting["name"], setting["reference"]
    base = times["unaccelerated"]
    out = {"model": model, "setting": name, "processes": world if setting["mode"] else 1, "threads_per_process": 1,
           "mode": setting["mode"], "transport": setting.get("transport", _transport(setting, world)),
           "seconds": [round(s, 3) for s in times[name]],
           "median_seconds": round(statistics.median(times[name]), 3),
           "speedup_vs_unaccelerated_1proc": _paired(base, times[name]),
           "busiest_rank_cpu_seconds": round(statistics.median(cpu[name]), 3),
           "cpu_speedup_vs_unaccelerated_1proc": _paired(cpu["unaccelerated"], cpu[name])}
    if setting["mode"] == "independent":  # twice the work: throughput, not speedup
        out["throughput_vs_1proc"] = round(2 * out.pop("speedup_vs_unaccelerated_1proc"), 3)
    if setting.get("warmup") is not None:
        out["warmup_steps"] = setting["warmup"]
    if setting["plan"] and setting["mode"]:
        plan_alone = times[reference]
        out["speedup_vs_plan_1proc"] = _paired(plan_alone, times[name])
        out["cpu_speedup_vs_plan_1proc"] = _paired(cpu[reference], cpu[name])
    if reference is not None:
        psnr = psnr_per_image(images[name].clamp(0, 1), images[reference].clamp(0, 1))
        out.update(reference=f"{reference} (1 process)", bitwise=bool(torch.equal(images[name], images[reference])),
                   psnr=round(float(psnr.mean()), 2), psnr_min=round(float(psnr.min()), 2))
    out["command"] = command(model, args)
    return out


def _transport(setting: dict, world: int) -> str | None:
    if setting["mode"] in (None, "independent"):
        return None
    return "shared memory (synchronous gathers)" if shm.usable(current()) and world > 1 else "gloo"


def _paired(base: list[float], other: list[float]) -> float:
    return round(statistics.median(b / o for b, o in zip(base, other)), 3)


def command(model: str, args: argparse.Namespace) -> str:
    script = "benchmarks/gpu_parallel.py" if args.device == "cuda" else "benchmarks/parallel.py"
    return shlex.join(["python", script, "--models", model, "--reps", str(args.reps), "--per-class",
                       str(args.per_class), "--steps", str(args.steps)])


def machine() -> dict:
    """What the machine was doing: load averages and the busiest other processes (a shared machine)."""
    busy = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    return {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "busiest_processes": [line.strip()[:110] for line in busy.splitlines()[1:9]],
            "torch": torch.__version__, "python": platform.python_version()}


def worker(rank: int, args: argparse.Namespace) -> None:
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    rows, before = [], machine()
    for model in args.models:
        rows += measure(model, args, device)
    if rank == 0:
        path = Path(args.out)
        write_json(path, {"benchmark": "parallel sampling (diffaccel.parallel)", "device": args.device,
                          "world_size": args.nprocs, "steps": args.steps, "per_class": args.per_class,
                          "reps": args.reps, "machine_before": before, "machine_after": machine(),
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows})
        for r in rows:
            print(_line(r), flush=True)


def _line(r: dict) -> str:
    head = f"{r['model']:5s} {r['setting']:24s} {r['median_seconds']:8.2f}s "
    if "throughput_vs_1proc" in r:
        return head + f"throughput x{r['throughput_vs_1proc']:.2f} of 1 process (the ceiling)"
    line = head + f"x{r['speedup_vs_unaccelerated_1proc']:.2f} vs 1 process"
    line += f" (busiest rank's CPU time x{r['cpu_speedup_vs_unaccelerated_1proc']:.2f})"
    if "speedup_vs_plan_1proc" in r:
        line += f", x{r['speedup_vs_plan_1proc']:.2f} vs the plan alone (CPU x{r['cpu_speedup_vs_plan_1proc']:.2f})"
    if "psnr" in r:
        line += f" | {r['psnr']:.1f} dB{' (bitwise)' if r['bitwise'] else ''}"
    return line


def parse(argv: list[str] | None = None, device: str = "cpu", nprocs: int = 2,
          per_class: int = 2) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["dit", "unet"], choices=["dit", "unet"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=per_class)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--warmups", type=int, nargs="+", default=list(WARMUPS))
    parser.add_argument("--nprocs", type=int, default=nprocs)
    parser.add_argument("--out", default=str(RESULTS / ("gpu_parallel.json" if device == "cuda" else "parallel.json")))
    args = parser.parse_args(argv)
    args.device = device
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    os.environ.setdefault("DIFFACCEL_DIST_TIMEOUT", "1800")  # rank 1 idles at a barrier through long runs
    spawn(worker, args.nprocs, (args,))


if __name__ == "__main__":
    sys.exit(main())
