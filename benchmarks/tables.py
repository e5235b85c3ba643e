"""Markdown tables of the committed benchmark results, and the benchmarks page built from them.

    python benchmarks/tables.py engine dit      # or: engine unet, quant|search|joint|bench dit|unet
    python benchmarks/tables.py docs            # docs/benchmarks.md from benchmarks/benchmarks.md.in
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def engine(model: str) -> str:
    rows = sorted(json.loads((RESULTS / f"engine_{model}.json").read_text()),
                  key=lambda r: (r["method"], r["speedup_macs"]))
    base_acc = rows[0]["baseline_accuracy"]
    lines = [f"**{model}** (unaccelerated accuracy {base_acc:.1%}, FD {rows[0]['baseline_fd']:.3f}):", "",
             "| method | setting | MACs | wall | wall/MACs | PSNR (min) | SSIM | accuracy | FD |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r['speedup_macs']:.2f}x | {r['speedup_wall']:.2f}x | "
                     f"{r['speedup_wall'] / r['speedup_macs']:.2f} | {r['psnr']:.1f} ({r['psnr_min']:.1f}) | "
                     f"{r['ssim']:.3f} | {r['accuracy']:.1%} | {r['fd']:.3f} |")
    good = [r for r in rows if r["psnr"] >= 30 and abs(r["accuracy"] - r["baseline_accuracy"]) <= 0.01]
    if good:
        best = max(good, key=lambda r: r["speedup_wall"])
        lines += ["", f"Best wall-clock speedup at mean PSNR >= 30 dB with accuracy within 1 point: "
                      f"{best['method']} {best['setting']}: {best['speedup_wall']:.2f}x wall, "
                      f"{best['speedup_macs']:.2f}x MACs, {best['psnr']:.1f} dB, accuracy {best['accuracy']:.1%}."]
    return "\n".join(lines)


def quant(model: str) -> str:
    rows = json.loads((RESULTS / f"quant_{model}.json").read_text())
    lines = [f"**{model}**:", "",
             "| plan | images | wall vs fp32 | MACs | PSNR | SSIM | accuracy (fp32) | FD (fp32) | weight memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['n_images']} | {r['speedup_wall']:.2f}x | {r['speedup_macs']:.2f}x | "
                     f"{r['psnr']:.1f} | {r['ssim']:.3f} | {r['accuracy']:.1%} ({r['baseline_accuracy']:.1%}) | "
                     f"{r['fd']:.3f} ({r['baseline_fd']:.3f}) | {r['weight_memory_ratio']:.1%} |")
    return "\n".join(lines)


def search(model: str) -> str:
    data = json.loads((RESULTS / f"search_{model}.json").read_text())
    lines = [f"**{model}** ({data['heldout_images']} held-out images):", "",
             "| strategy | search | MACs | wall | PSNR calib / held-out | hand-made at equal PSNR "
             "| cheaper (MACs / wall) | hand-made PSNR at equal MACs / wall |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        eq = r["equal_quality"]
        hand = (f"{eq['handmade_speedup_macs']:.2f}x MACs, {eq['handmade_speedup_wall']:.2f}x wall"
                if "handmade_speedup_macs" in eq else "outside the hand-made front")
        cheaper = f"{eq['cheaper_macs']:.0%} / {eq['cheaper_wall']:.0%}" if "cheaper_macs" in eq else "-"
        at_cost = " / ".join(f"{eq[k]:.2f} dB" if eq.get(k) is not None else "-"
                             for k in ("handmade_psnr_at_equal_macs", "handmade_psnr_at_equal_wall"))
        lines.append(f"| {r['strategy']} | {r['search_seconds'] / 60:.1f} min | {r['speedup_macs']:.2f}x | "
                     f"{r['speedup_wall']:.2f}x | {calib_text(r)} / {r['heldout_psnr']:.2f} dB | {hand} | "
                     f"{cheaper} | {at_cost} |")
    return "\n".join(lines)


def calib_text(row: dict) -> str:
    if row.get("calib_psnr_corrected") is not None:
        return f"{row['calib_psnr']:.2f} ({row['calib_psnr_corrected']:.2f} corrected)"
    return f"{row['calib_psnr']:.2f}"


def joint(model: str) -> str:
    data = json.loads((RESULTS / f"joint_{model}.json").read_text())
    lines = [f"**{model}** ({data['heldout_images']} held-out images, PSNR against the fp32 50-step output):", "",
             "| part | plan | settings | MACs | PSNR | bit-weighted MACs |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        settings = {k: v for k, v in r["settings"].items() if k != "key_steps"}
        bops = f"{r['bops_fraction']:.3f}" if r.get("bops_fraction") is not None else "-"
        lines.append(f"| {r['part']} | {r['name']} | {settings} | {r['speedup_macs']:.2f}x | {r['psnr']:.2f} "
                     f"| {bops} |")
    return "\n".join(lines)


def _bench_data(model: str) -> tuple[dict, str, list[str]]:
    """A committed bench run's results, the quality score it reports, and its table's heading."""
    data = json.loads((RESULTS / f"bench-{model}" / "results.json").read_text())
    base = data["baseline"]
    no_p5 = "; this run predates the 5th percentile: PSNR is the mean alone" \
        if any(r.get("psnr_p5") is None for r in data["rows"]) else ""
    score = "adherence" if base.get("adherence") is not None else "accuracy"  # text-to-image: the prompt's attributes
    heading = [f"**{model}** ({data['samples']['n_images']} images per setting; baseline FD {base['fd']:.3f}, {score} "
               f"{base[score]:.1%}{no_p5}):", ""]
    return data, score, heading


def _bench_cells(row: dict, base: dict, score: str) -> str:
    return (f"{row['speedup_wall']:.2f}x | {row['speedup_macs']:.2f}x | {row['psnr']:.2f}{_p5(row)} | {row['fd']:.3f} "
            f"({row['fd'] / base['fd'] - 1:+.1%}) | {_judged(row, score)} |")


def _judged(row: dict, score: str) -> str:
    """A bench row's accuracy or adherence, with its paired change from the baseline and the change's
    95% interval where the run recorded them (runs from 2026-12-06 on)."""
    paired = (row.get("paired") or {}).get(score)
    if paired is None:
        return f"{row[score]:.1%}"
    interval = "" if paired["low"] is None else f", {paired['low'] * 100:+.1f}..{paired['high'] * 100:+.1f}"
    return f"{row[score]:.1%} ({paired['change'] * 100:+.1f} pt{interval})"


def bench(model: str) -> str:
    """The summary of a committed ``diffaccel bench`` run: each name's best wall-clock speedup at mean
    PSNR >= 30 dB, with that row's MACs, FD and accuracy next to the baseline's, fastest first."""
    data, score, lines = _bench_data(model)
    rows = {(r["name"], r["setting"]): r for r in data["rows"]}
    lines += ["| name | family | best setting at PSNR >= 30 dB | wall | MACs | PSNR (p5) | FD (vs baseline) "
              f"| {score} |", "|---|---|---|---|---|---|---|---|"]
    ranked = sorted(data["summary"].items(), key=lambda kv: -(kv[1]["speedup_wall"] or 0))
    for name, best in ranked:
        if best["speedup_wall"] is None:
            lines.append(f"| {name} | {best['family']} | {best['note'] or '-'} | | | | | |")
            continue
        lines.append(f"| {name} | {best['family']} | {best['setting']} | "
                     + _bench_cells(rows[(name, best["setting"])], data["baseline"], score))
    return "\n".join(lines)


def bench_rows(model: str) -> str:
    """Every row of a committed ``diffaccel bench`` run (where the summary shows each name's best alone)."""
    data, score, lines = _bench_data(model)
    lines += [f"| name | setting | wall | MACs | PSNR (p5) | FD (vs baseline) | {score} |",
              "|---|---|---|---|---|---|---|"]
    for row in sorted(data["rows"], key=lambda r: -(r["speedup_wall"] or 0)):
        lines.append(f"| {row['name']} | {row['setting']} | " + _bench_cells(row, data["baseline"], score))
    return "\n".join(lines)


def _p5(row: dict) -> str:
    """The 5th-percentile PSNR beside the mean (bench files before it was recorded have none)."""
    return f" ({row['psnr_p5']:.1f})" if row.get("psnr_p5") is not None else ""


def joint_search(model: str) -> str:
    data = json.loads((RESULTS / f"joint_search_{model}.json").read_text())
    t2i = any(r.get("adherence") is not None for r in data["rows"])
    score = "adherence" if t2i else "accuracy"
    lines = [f"**{data['model']}** (`{data['command'].removeprefix('python benchmarks/joint_search.py ')}`; search "
             f"{data['search_seconds']:.0f} s of a {data['time_limit']} limit; {data['heldout_images']} held-out "
             f"images, budget `{data['budget']}` on calibration"
             + ("; a CPU without native bfloat16" if data.get("bf16_native") is False else "") + "):", "",
             f"| plan | sampler | MACs | wall | PSNR (p5, min) | SSIM | {score} (50-step DDIM) | FD (50-step DDIM) |",
             "|---|---|---|---|---|---|---|---|"]
    lowered = data["summary"].get("precision")  # the searched plan's autocast dtype, if the search kept one
    for r in data["rows"]:
        name = f"{r['name']} in {lowered}" if lowered and r["name"] == "searched (joint)" else r["name"]
        lines.append(f"| {name} | {r['solver'] or 'ddim 50'} | {_call_macs(r, t2i)} | "
                     f"{r['speedup_wall']:.2f}x | "
                     f"{r['psnr']:.2f} ({r['psnr_p5']:.1f}, {r['psnr_min']:.1f}) | {r['ssim']:.3f} | "
                     f"{r[score]:.1%} ({r['baseline_' + score]:.1%}) | {r['fd']:.3f} ({r['baseline_fd']:.3f}) |")
    return "\n".join(lines)


def _call_macs(row: dict, t2i: bool) -> str:
    """The MAC speedup of the whole call, with the denoiser's where they differ (a text encoder and a
    decoder run once per call); results from before 2026-12-03 counted the denoiser only."""
    if "speedup_macs_denoiser" not in row:
        return f"{row['speedup_macs']:.2f}x" + (" (denoiser only)" if t2i else "")
    whole, denoiser = row["speedup_macs"], row["speedup_macs_denoiser"]
    return f"{whole:.2f}x" + (f" ({denoiser:.2f}x denoiser)" if abs(whole / denoiser - 1) > 0.005 else "")


def samplers(model: str) -> str:
    data = json.loads((RESULTS / f"samplers_{model}.json").read_text())
    lines = [f"**{model}** ({data['images']} held-out images; PSNR against 50-step DDIM, whose accuracy is "
             f"{data['baseline_accuracy']:.1%} and FD {data['baseline_fd']:.3f}):", "",
             "| sampler | steps | PSNR (p5) | SSIM | accuracy | FD |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['solver']} | {r['steps']} | {r['psnr']:.2f} ({r['psnr_p5']:.1f}) | {r['ssim']:.3f} | "
                     f"{r['accuracy']:.1%} | {r['fd']:.3f} |")
    most = max(r["steps"] for r in data["rows"])
    reach = ", ".join(f"{name} {steps if steps is not None else f'more than {most}'}"
                      for name, steps in data["steps_to_30db"].items())
    return "\n".join(lines + ["", f"Fewest steps to a mean PSNR of 30 dB: {reach}."])


def adherence(model: str) -> str:
    """``benchmarks/adherence_t2i.py``'s rows: adherence, and the images lost and won against the reference."""
    data = json.loads((RESULTS / f"adherence_{model}.json").read_text())
    lines = [f"**{model}** ({data['images']} images, `{data['command']}`; the 50-step DDIM reference's adherence "
             f"{data['reference_adherence']:.1%}):", "",
             "| setting | adherence | images lost / won | lost on shape, colour | PSNR (p5) |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        by = r["lost_by_attribute"]
        lines.append(f"| {r['setting']} | {r['adherence']:.1%} ({r['adherence'] - data['reference_adherence']:+.1%}) "
                     f"| {r['lost']} / {r['won']} | {by['shape']}, {by['colour']} | {r['psnr']:.2f} "
                     f"({r['psnr_p5']:.1f}) |")
    return "\n".join(lines)


TABLES = {"adherence": adherence, "engine": engine, "quant": quant, "search": search, "joint": joint, "bench": bench,
          "bench_rows": bench_rows, "joint_search": joint_search, "samplers": samplers}


def docs_page() -> str:
    """The template with every ``{{kind model}}`` replaced by that table."""
    template = (Path(__file__).parent / "benchmarks.md.in").read_text()
    return re.sub(r"\{\{(\w+) ([\w.-]+)\}\}", lambda m: TABLES[m.group(1)](m.group(2)), template)


if __name__ == "__main__":
    if sys.argv[1] == "docs":
        path = Path(__file__).parent.parent / "docs" / "benchmarks.md"
        path.write_text(docs_page())
        print(f"wrote {path}")
    else:
        print(TABLES[sys.argv[1]](sys.argv[2]))
