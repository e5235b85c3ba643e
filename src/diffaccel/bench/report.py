"""The benchmark report: ``results.md`` (tables) and a self-contained ``report.html`` (plots and
sample grids inlined as base64 PNGs), both rendered from a ``results.json`` alone."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from diffaccel.bench.results import BenchError, Results, Row, headline, meets_floor

COLORS = {"diffaccel": "#1f77b4", "peer": "#d62728", "steps": "#7f7f7f"}
LABELS = {"diffaccel": "diffaccel", "peer": "peers", "steps": "fewer steps"}
MARKERS = "os^Dv<>pP*Xh"


# -- choosing what to show ---------------------------------------------------------------------------------
def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both speed and quality, by increasing speed."""
    front, best = [], float("-inf")
    for speed, quality in sorted(points, key=lambda p: (-p[0], -p[1])):
        if quality > best:
            front.append((speed, quality))
            best = quality
    return sorted(front)


def best_ours(results: Results) -> Row | None:
    """Our fastest row (wall clock) at the PSNR floor, else our highest-PSNR row."""
    ours = [r for r in results.rows if r.family == "diffaccel" and r.speedup_wall is not None]
    good = [r for r in ours if meets_floor(r.model_dump(), results.psnr_floor, results.baseline.adherence,
                                         results.psnr_p5_floor)]
    if good:
        return max(good, key=lambda r: r.speedup_wall)
    return max(ours, key=lambda r: r.psnr) if ours else None


def best_peer_at(results: Results, speed: float | None) -> Row | None:
    """The peer row with the best PSNR among those at least 90% as fast as ``speed`` (the same
    speed, give or take the noise of wall-clock ratios), else the fastest peer row."""
    peers = [r for r in results.rows if r.family == "peer" and r.speedup_wall is not None]
    if not peers:
        return None
    if speed is not None:
        near = [r for r in peers if r.speedup_wall >= 0.9 * speed]
        if near:
            return max(near, key=lambda r: r.psnr)
    return max(peers, key=lambda r: r.speedup_wall)


# -- pieces -------------------------------------------------------------------------------------------------
def _png_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _grid_b64(base: Path, rel: str | None, what: str) -> str:
    if not rel:
        raise BenchError(f"the results have no sample grid for {what}")
    path = base / rel
    try:
        data = path.read_bytes()
    except OSError:
        raise BenchError(f"the sample grid of {what} ({path}) is missing; keep the run folder next to "
                         "results.json or rerun `diffaccel bench`") from None
    if not data.startswith(b"\x89PNG"):
        raise BenchError(f"the sample grid of {what} ({path}) is not a PNG file")
    return _png_b64(data)


DIFFERENCE_GAIN = 10


def difference_b64(base_png: str, other_png: str) -> str:
    """The absolute difference of two sample grids of the same layout, amplified and inverted
    (white: identical), as a base64 PNG."""
    a, b = (np.asarray(Image.open(io.BytesIO(base64.b64decode(x))).convert("RGB"), dtype=np.float32)
            for x in (base_png, other_png))
    if a.shape != b.shape:
        raise BenchError("the sample grids to compare have different sizes")
    diff = np.clip(np.abs(a - b).mean(axis=2) * DIFFERENCE_GAIN, 0, 255)
    buf = io.BytesIO()
    Image.fromarray((255 - diff).astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def plot(results: Results, axis: str) -> bytes:
    """PSNR against speedup (``axis``: "wall" or "macs"), a colour per family, a marker per name,
    each family's Pareto front as a line, the PSNR floor dashed."""
    key = "speedup_wall" if axis == "wall" else "speedup_macs"
    fig, ax = plt.subplots(figsize=(13, 6.2), dpi=100)
    names: dict[str, list[Row]] = {}
    for row in results.rows:
        if getattr(row, key) is not None:
            names.setdefault(row.name, []).append(row)
    marker_of: dict[str, str] = {}
    for family in ("diffaccel", "peer", "steps"):
        fam_names = [n for n, rows in names.items() if rows[0].family == family]
        for i, name in enumerate(fam_names):
            marker_of[name] = MARKERS[i % len(MARKERS)]
            rows = names[name]
            ax.scatter([getattr(r, key) for r in rows], [r.psnr for r in rows], color=COLORS[family],
                       marker=marker_of[name], s=54, alpha=0.85, label=f"{name} ({LABELS[family]})")
        points = [(getattr(r, key), r.psnr) for n in fam_names for r in names[n]]
        front = pareto(points)
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="pre", color=COLORS[family], lw=1.4,
                    alpha=0.7, label=f"{LABELS[family]}: Pareto front")
    ax.axhline(results.psnr_floor, color="k", ls="--", lw=0.8)
    ax.axvline(1.0, color="k", ls=":", lw=0.6)
    ax.set_xlabel("speedup, wall clock (x)" if axis == "wall" else "speedup, MACs executed (x)", fontsize=12)
    ax.set_ylabel("PSNR vs unaccelerated (dB)", fontsize=12)
    ax.set_title(f"{results.model}: quality vs {'wall-clock' if axis == 'wall' else 'MAC'} speedup", fontsize=13)
    ax.tick_params(labelsize=11)
    ax.grid(alpha=0.3)
    if names:
        ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                  ncol=2 if len(names) > 18 else 1)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _judged(r: Row, metric: str) -> str:
    """An evaluator score, with its change from the baseline's images of the same seeds and its interval."""
    value, paired = getattr(r, metric), r.paired.get(metric)
    if value is None or paired is None:
        return _pct(value)
    interval = "" if paired.low is None else f", {paired.low * 100:+.1f}..{paired.high * 100:+.1f}"
    return f"{value:.1%} ({paired.change * 100:+.1f} pt{interval})"


PAIRED_NOTE = ("Accuracy and adherence: beside each, its change from the baseline's images of the same seeds, in "
               "points, with a 95% interval (paired: a few images flip either way between any two runs).")


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def summary_lines(results: Results) -> list[tuple[str, str, str]]:
    """(name, family, "speedup at PSNR >= floor" text), fastest first."""
    items = sorted(results.summary.items(), key=lambda kv: -(kv[1].speedup_wall or 0.0))
    out = []
    for name, best in items:
        if best.speedup_wall is None:
            text = best.note or "-"
        else:
            tail = "" if best.psnr_p5 is None else f" (5th pct {best.psnr_p5:.1f})"
            text = (f"{best.speedup_wall:.2f}x wall ({_fmt(best.speedup_macs)}x MACs) at {best.psnr:.1f} dB{tail}, "
                    f"{best.setting}")
        out.append((name, best.family, text))
    return out


COLUMNS = ("family", "name", "setting", "speedup wall", "speedup MACs", "peak MB", "+MB", "PSNR (5th pct)", "SSIM",
           "accuracy", "adherence", "FD")


def _cells(r: Row) -> list[str]:
    return [r.family, r.name, r.setting, _fmt(r.speedup_wall), _fmt(r.speedup_macs), _fmt(r.peak_mem_mb, ".0f"),
            _fmt(r.mem_over_baseline_mb, "+.0f"), f"{r.psnr:.2f} ({_fmt(r.psnr_p5, '.1f')})", f"{r.ssim:.4f}",
            _judged(r, "accuracy"), _judged(r, "adherence"), _fmt(r.fd)]


def _md_row(cells: Iterable[str]) -> str:
    """A table row; a ``|`` inside a cell (a plan file's name, a prompt) would start another column."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def markdown(results: Results) -> str:
    s = results.samples.model_dump()
    lines = [f"# diffaccel bench: {results.model}", "",
             f"{results.created}; {s['n_images']} images ({s['per_class']} per class), batch {s['batch_size']}, "
             f"{results.baseline.steps} {results.baseline.sampler} steps, guidance {results.baseline.guidance:g}, "
             f"{results.threads} thread(s); torch {results.versions.get('torch')}, "
             f"diffusers {results.versions.get('diffusers')}.", ""]
    if s.get("note"):
        lines += [f"Note: {s['note']}.", ""]
    lines += [f"## Speedup at {headline(results.psnr_floor, results.psnr_p5_floor)}", "",
              "| name | family | best |", "|---|---|---|"]
    lines += [_md_row(item) for item in summary_lines(results)]
    b = results.baseline
    lines += ["", "## All settings", "",
              f"Baseline: accuracy {_pct(b.accuracy)}, adherence {_pct(b.adherence)}, FD {_fmt(b.fd)} "
              f"(floor {_fmt(b.fd_floor)}), "
              f"{b.seconds_per_image:.3f} s/image, peak {_fmt(b.peak_mem_mb, '.0f')} MB. {PAIRED_NOTE}", "",
              "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [_md_row(_cells(r)) for r in results.rows]
    if results.skipped:
        lines += ["", "## Skipped", ""]
        lines += [f"- {x.name} {x.setting or '(all settings)'}: {x.reason}" for x in results.skipped]
    if results.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in results.warnings]
    return "\n".join(lines) + "\n"


CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}td:nth-child(-n+3),th{text-align:left}
.fam-diffaccel{color:#1f77b4}.fam-peer{color:#d62728}.fam-steps{color:#7f7f7f}
figure{display:inline-block;margin:0.5em 1em 0.5em 0;vertical-align:top}
figcaption{font-size:13px;max-width:420px}
img.grid{image-rendering:pixelated;border:1px solid #ccc;zoom:1.5}
img.plot{width:100%}
.note{background:#fff6d5;padding:4px 8px}
"""


def sample_grids(results: Results, base: Path) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(title, base64 PNG, caption) of the baseline grid, the best rows' grids and, beside each, its
    amplified difference to the baseline; and why each grid that could not be read is left out (a
    results file without its run folder still renders, without its pictures)."""
    ours = best_ours(results)
    peer = best_peer_at(results, ours.speedup_wall if ours else None)
    wanted = [("unaccelerated baseline", results.baseline.grid, "the baseline",
               f"{results.baseline.steps} {results.baseline.sampler} steps")]
    for label, row in (("best diffaccel", ours), ("best peer at that speed", peer)):
        if row is not None:
            wanted.append((f"{label}: {row.name} {row.setting}", row.grid, row.name,
                           f"{_fmt(row.speedup_wall)}x wall, {_fmt(row.speedup_macs)}x MACs, PSNR {row.psnr:.1f} dB"))
    grids, missing = [], []
    for title, rel, what, caption in wanted:
        try:
            grids.append((title, _grid_b64(base, rel, what), caption))
        except BenchError as exc:
            missing.append(str(exc))
    if not grids or grids[0][0] != wanted[0][0]:  # no baseline grid: no differences to draw
        return grids, missing
    base_grid = grids[0][1]
    return grids[:1] + [item for title, b, cap in grids[1:] for item in (
        (title, b, cap), (f"|difference| x{DIFFERENCE_GAIN}: {title.split(':', 1)[1].strip()}",
                          difference_b64(base_grid, b), "white where identical to the baseline"))], missing


def render_html(results: Results, grids: list[tuple[str, str, str]], missing: list[str]) -> str:
    """The page, with the sample grids given (``sample_grids``) and a note of those missing."""
    esc = html.escape
    s = results.samples.model_dump()
    plots = [("wall", _png_b64(plot(results, "wall"))), ("macs", _png_b64(plot(results, "macs")))]

    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>diffaccel bench: "
           f"{esc(results.model)}</title><style>{CSS}</style></head><body>",
           f"<h1>diffaccel bench: {esc(results.model)}</h1>",
           f"<p>{esc(results.created)} &middot; {s['n_images']} images ({s['per_class']} per class, batch "
           f"{s['batch_size']}, {s['wall_pairs']} interleaved batches) &middot; {results.baseline.steps} "
           f"{esc(results.baseline.sampler)} steps, guidance {results.baseline.guidance:g} &middot; "
           f"{results.threads} thread(s) &middot; {esc(str(results.machine.get('platform')))} &middot; torch "
           f"{esc(str(results.versions.get('torch')))}, diffusers {esc(str(results.versions.get('diffusers')))}</p>"]
    if s.get("note"):
        out.append(f"<p class='note'>{esc(s['note'])}</p>")
    out.append(f"<h2 id='summary'>Speedup at {esc(headline(results.psnr_floor, results.psnr_p5_floor))}</h2><table>"
               "<tr><th>name</th><th>family</th><th>best setting at the floor</th></tr>")
    out += [f"<tr><td>{esc(n)}</td><td class='fam-{f}'>{f}</td><td style='text-align:left'>{esc(t)}</td></tr>"
            for n, f, t in summary_lines(results)]
    out.append("</table>")
    out.append("<h2 id='plots'>Quality vs speed</h2><p>Wall clock: median over interleaved batches of baseline "
               "time / setting time. MACs: counted with torch's FlopCounterMode on each setting's first (warm-up) "
               "batch; where the work depends on the input (runtime rules, dynamic peers) that is the first "
               "batch's count, a few percent from the run's mean (diffaccel's rows also carry the executor's count "
               "over every batch: speedup_macs_executor in results.json). Lines: each family's Pareto front.</p>")
    out += [f"<figure><img class='plot' id='plot-{k}' alt='PSNR vs {k} speedup' src='data:image/png;base64,{b}'>"
            f"</figure>" for k, b in plots]
    out.append("<h2 id='grids'>Samples (same seeds; a row per class)</h2>")
    out += [f"<p class='note'>Left out: {esc(why)}</p>" for why in missing]
    out += [f"<figure><img class='grid' alt='{esc(title)}' src='data:image/png;base64,{b}'>"
            f"<figcaption><b>{esc(title)}</b><br>{esc(cap)}</figcaption></figure>" for title, b, cap in grids]
    b = results.baseline
    out.append(f"<h2 id='rows'>All settings</h2><p>Baseline: accuracy {_pct(b.accuracy)}, adherence "
               f"{_pct(b.adherence)}, FD {_fmt(b.fd)} "
               f"(real-vs-real floor {_fmt(b.fd_floor)}), {b.seconds_per_image:.3f} s/image, peak RSS "
               f"{_fmt(b.peak_mem_mb, '.0f')} MB. Peak MB: the worker process's peak RSS during the setting's runs; "
               f"+MB: its excess over the baseline's in the same process (cache buffers). {PAIRED_NOTE}</p><table><tr>"
               + "".join(f"<th>{esc(c)}</th>" for c in COLUMNS) + "</tr>")
    for r in results.rows:
        cells = [esc(c) for c in _cells(r)]
        cells[0] = f"<span class='fam-{r.family}'>{cells[0]}</span>"
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    if results.skipped:
        out.append("<h2 id='skipped'>Skipped</h2><ul>")
        out += [f"<li><b>{esc(x.name)}</b> {esc(x.setting or '(all settings)')}: {esc(x.reason)}</li>"
                for x in results.skipped]
        out.append("</ul>")
    if results.warnings:
        out.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{esc(w)}</li>" for w in results.warnings) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Rendered:
    """A report in memory: results.md, report.html, and why each sample grid it lacks is missing."""

    markdown: str
    html: str
    missing: list[str]


def render_report(results: Results, base: Path) -> Rendered:
    """The report's files' text, grid paths relative to ``base``; nothing is written. A grid that is
    gone is left out of the page (``missing`` says which): the tables need none."""
    grids, missing = sample_grids(results, Path(base))
    return Rendered(markdown(results), render_html(results, grids, missing), missing)


def save_report(out: Path, rendered: Rendered, keep_page: bool = False) -> tuple[Path, Path]:
    """Replace ``out/results.md`` and ``out/report.html`` (not with ``keep_page``), each through a temporary file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "results.md", rendered.markdown)
    if not keep_page:
        _atomic_write(out / "report.html", rendered.html)
    return out / "results.md", out / "report.html"


def write_report(results: Results, base: Path, out: Path) -> tuple[Path, Path]:
    """Render both files in memory first, then save them."""
    return save_report(out, render_report(results, base))
