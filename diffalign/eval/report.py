"""Readable output of evaluation runs: plain-text tables for the terminal and a self-contained HTML report.

The HTML report has no scripts, no stylesheets or fonts from elsewhere and no network references: images are small
JPEG thumbnails embedded as base64 ``data:`` URIs and the score histograms are inline SVG drawn here. A run report
shows, per scorer, the histogram of image scores (dashed line: the mean) and grids of the best and worst images;
a comparison report shows the win-rate table, both runs' histograms overlaid and, per scorer, the two runs' images
side by side for the same prompt and seed (biggest gains, biggest losses, a random sample; ``eval.sidebyside``).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffalign.eval import sidebyside, stats


COLORS = ("#3366cc", "#dc6a12")
THUMB_PX = 160
STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td { font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: 136px; font-size: 12px; }
figure img { width: 128px; height: 128px; object-fit: contain; background: #eee; display: block; }
figcaption { overflow-wrap: anywhere; }
.missing { width: 128px; height: 128px; background: #fdd; display: flex; align-items: center; justify-content: center; }
section.scorer { border-top: 2px solid #ddd; margin-top: 24px; }
.note { color: #a33; }
table.sbs td { vertical-align: middle; }
table.sbs figure { width: 132px; }
details.sbs { margin: 8px 0; }
details.sbs summary { cursor: pointer; font-weight: 600; }
svg text { font-size: 11px; fill: #333; }
"""


# ---- text --------------------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    """A score for display: 4 significant digits; None/NaN as ``-``."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def ci_text(d: Mapping[str, Any]) -> str:
    return "-" if d.get("ci_low") is None else f"[{fmt(d['ci_low'])}, {fmt(d['ci_high'])}]"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["scorer", "mean", "95% CI", "std", "images", "prompts", "variant"]
    rows = []
    for key, st in summary["stats"].items():
        variant = str(summary["scorers"][key]["variant"])
        rows.append(
            [key, fmt(st["mean"]), ci_text(st), fmt(st["std"]), str(st["n_images"]), str(st["n_prompts"]), variant]
        )
    return headers, rows


def run_table(summary: Mapping[str, Any]) -> str:
    """Per scorer: mean, 95% CI over prompts, std, counts, variant."""
    return text_table(*run_rows(summary))


def compare_rows(comparison: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    a, b = comparison["labels"]
    headers = [
        "scorer",
        f"{a} mean [95% CI]",
        f"{b} mean [95% CI]",
        f"{a}-{b} [95% CI]",
        f"win {a}>{b} [95% CI]",
        "W/T/L",
    ]
    rows = []
    for key, c in comparison["scorers"].items():
        d, w = c["difference"], c["win_rate"]
        rows.append(
            [
                key,
                f"{fmt(c[a]['mean'])} {ci_text(c[a])}",
                f"{fmt(c[b]['mean'])} {ci_text(c[b])}",
                f"{fmt(d['mean'])} {ci_text(d)}",
                f"{w['win_rate']:.1%} [{w['ci_low']:.1%}, {w['ci_high']:.1%}]" if w["n"] else "-",
                f"{w['wins']}/{w['ties']}/{w['losses']}",
            ]
        )
    return headers, rows


def compare_table(comparison: Mapping[str, Any]) -> str:
    """Per scorer: both means with CIs, the paired difference and the per-prompt win rate; then the notes."""
    text = text_table(*compare_rows(comparison))
    notes = comparison.get("notes") or []
    return text + "".join(f"\nnote: {n}" for n in notes)


# ---- SVG histogram -----------------------------------------------------------------------------------------


def svg_histogram(
    series: Sequence[tuple[str, Sequence[float]]],
    *,
    bins: int = 20,
    width: int = 460,
    height: int = 210,
    title: str = "",
) -> str:
    """Inline ``<svg>``: one bar set per (label, values) on shared bins, a dashed line at each series' mean."""
    every = [v for _, values in series for v in values]
    lo, hi = min(every), max(every)
    left, right, top, bottom = 46, 12, 22, 34
    pw, ph = width - left - right, height - top - bottom
    hists = [stats.histogram(values, bins, (lo, hi) if hi > lo else None) for _, values in series]
    edges = hists[0][1]
    ymax = max(max(counts) for counts, _ in hists) or 1

    def x(v: float) -> float:
        return left + (v - edges[0]) / (edges[-1] - edges[0]) * pw

    def y(c: float) -> float:
        return top + ph - c / ymax * ph

    label = html.escape(title or "score histogram", quote=True)
    parts = [
        f'<svg class="histogram" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{label}">'
    ]
    opacity = "1" if len(series) == 1 else "0.55"
    for (name, values), (counts, _), color in zip(series, hists, COLORS, strict=False):
        for c, e0, e1 in zip(counts, edges[:-1], edges[1:], strict=True):
            if c:
                parts.append(
                    f'<rect x="{x(e0):.2f}" y="{y(c):.2f}" width="{max(x(e1) - x(e0) - 1, 0.5):.2f}" '
                    f'height="{ph + top - y(c):.2f}" fill="{color}" fill-opacity="{opacity}"><title>{c} images in '
                    f"[{fmt(e0)}, {fmt(e1)})</title></rect>"
                )
        mean = sum(values) / len(values)
        parts.append(
            f'<line x1="{x(mean):.2f}" x2="{x(mean):.2f}" y1="{top}" y2="{top + ph}" stroke="{color}" '
            f'stroke-width="1.5" stroke-dasharray="4 3"><title>{html.escape(name)} mean {fmt(mean)}</title></line>'
        )
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#333"/>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" stroke="#333"/>')
    for i in range(5):
        v = edges[0] + (edges[-1] - edges[0]) * i / 4
        parts.append(f'<text x="{x(v):.2f}" y="{top + ph + 15}" text-anchor="middle">{fmt(v)}</text>')
    parts.append(f'<text x="{left - 5}" y="{top + 4}" text-anchor="end">{ymax}</text>')
    parts.append(f'<text x="{left - 5}" y="{top + ph}" text-anchor="end">0</text>')
    parts.append(f'<text x="{left + pw / 2:.2f}" y="{height - 4}" text-anchor="middle">{label}</text>')
    for i, ((name, values), color) in enumerate(zip(series, COLORS, strict=False)):
        legend = html.escape(f"{name} (n={len(values)}, mean {fmt(sum(values) / len(values))})")
        parts.append(f'<rect x="{left + 8 + i * 200}" y="4" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{left + 22 + i * 200}" y="13">{legend}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---- HTML pieces -------------------------------------------------------------------------------------------


def thumbnail_uri(path: Path, size: int = THUMB_PX) -> str:
    """A JPEG thumbnail (longest side ``size``) as a ``data:`` URI."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _Thumbs:
    """Thumbnails by path, each image encoded once even when it shows up under several scorers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[str, str | None] = {}

    def get(self, path: str) -> str | None:
        if path not in self.cache:
            file = sidebyside.image_file(path, self.root)
            self.cache[path] = thumbnail_uri(file) if file.is_file() else None
        return self.cache[path]


def _figure(row: Mapping[str, Any], key: str, thumbs: _Thumbs, *, with_prompt: bool = True) -> str:
    prompt = str(row["prompt"]) if with_prompt else ""
    short = prompt if len(prompt) <= 90 else prompt[:87] + "..."
    uri = thumbs.get(str(row["path"]))
    alt = html.escape(prompt, quote=True)
    seed = row.get("seed")
    title = html.escape(str(row["path"]) + ("" if seed is None else f" (seed {seed})"), quote=True)
    img = (
        f'<img src="{uri}" alt="{alt}" title="{title}">'
        if uri
        else f'<div class="missing" title="{title}">image not found</div>'
    )
    return f"<figure>{img}<figcaption><b>{fmt(float(row[key]))}</b> {html.escape(short)}</figcaption></figure>"


def _side_by_side(
    pairs: Sequence[sidebyside.Pair], key: str, labels: Sequence[str], thumbs: tuple[_Thumbs, _Thumbs], k: int
) -> str:
    """Per view a table of rows ``prompt | seed | reference image | candidate image | difference``."""
    cand, ref = labels
    headers = "".join(f"<th>{html.escape(h)}</th>" for h in ("prompt", "seed", ref, cand, f"{cand} - {ref}"))
    out = []
    for view, title in zip(sidebyside.VIEWS, ("Biggest gains", "Biggest losses", "Random sample"), strict=True):
        rows = []
        for c, r in sidebyside.select(pairs, key, view, k):
            cells = [html.escape(str(c["prompt"])), html.escape(str(c.get("seed", "-")))]
            cells += [_figure(r, key, thumbs[1], with_prompt=False), _figure(c, key, thumbs[0], with_prompt=False)]
            cells.append(f"{sidebyside.difference((c, r), key):+.4g}")
            rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
        out.append(
            f'<details class="sbs {view}"{" open" if view == "gains" else ""}><summary>{title} ({len(rows)} of '
            f'{len(pairs)} pairs)</summary><table class="sbs"><thead><tr>{headers}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></details>"
        )
    return "".join(out)


def best_and_worst(rows: Sequence[Mapping[str, Any]], key: str, k: int) -> tuple[list[Any], list[Any]]:
    """The ``k`` highest-scoring rows (best first) and the ``k`` lowest (worst first), never overlapping."""
    ordered = sorted(rows, key=lambda r: float(r[key]), reverse=True)
    best = ordered[: min(k, (len(ordered) + 1) // 2)]
    rest = ordered[len(best) :]
    worst = list(reversed(rest[-k:])) if k else []
    return best, worst


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{body}</body></html>\n"
    )


def _protocol_table(summary: Mapping[str, Any]) -> str:
    items = {"kind": summary.get("kind"), "created": summary.get("created"), "image root": summary.get("image_root")}
    items |= {f"prompts.{k}": v for k, v in (summary.get("prompts") or {}).items()}
    protocol = dict(summary.get("protocol") or {})
    config = protocol.pop("scheduler_config", None)
    items |= protocol
    rows = [[str(k), "-" if v is None else str(v)] for k, v in items.items()]
    table = _html_table(["setting", "value"], rows, "protocol")
    if config is not None:
        table += f"<details><summary>scheduler config</summary><pre>{html.escape(json.dumps(config, indent=1))}</pre></details>"
    return table


# ---- reports -----------------------------------------------------------------------------------------------


def run_report(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], *, thumbs: int = 8) -> str:
    """The HTML page of one run: summary and protocol tables, then per scorer a histogram and best/worst grids."""
    cache = _Thumbs(Path(summary.get("image_root", ".")))
    body = ["<h1>diffalign eval</h1>", f"<p>{summary['n_images']} images, {summary['n_prompts']} prompts</p>"]
    body += [
        "<h2>Scores</h2>",
        _html_table(*run_rows(summary), "summary"),
        f"<p>CI: {html.escape(summary['ci_method'])}</p>",
    ]
    body += ["<h2>Protocol</h2>", _protocol_table(summary)]
    for i, key in enumerate(summary["stats"]):
        values = [float(r[key]) for r in rows]
        best, worst = best_and_worst(rows, key, thumbs)
        variant = html.escape(str(summary["scorers"][key]["variant"]))
        body.append(f'<section class="scorer" id="scorer-{i}"><h2>{html.escape(key)}</h2><p>variant: {variant}</p>')
        body.append(svg_histogram([(key, values)], title=f"{key} per image"))
        body.append(
            f'<h3>Best {len(best)}</h3><div class="grid best">{"".join(_figure(r, key, cache) for r in best)}</div>'
        )
        body.append(
            f'<h3>Worst {len(worst)}</h3><div class="grid worst">{"".join(_figure(r, key, cache) for r in worst)}</div>'
        )
        body.append("</section>")
    return _page("diffalign eval report", "".join(body))


def write_run_report(
    path: str | Path, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], *, thumbs: int = 8
) -> Path:
    path = Path(path)
    path.write_text(run_report(rows, summary, thumbs=thumbs), encoding="utf-8")
    return path


def compare_report(
    comparison: Mapping[str, Any],
    rows_a: Sequence[Mapping[str, Any]],
    rows_b: Sequence[Mapping[str, Any]],
    *,
    roots: tuple[Path, Path] = (Path("."), Path(".")),
    thumbs: int = 8,
) -> str:
    """The HTML page of a comparison: the win-rate table, notes, overlaid per-scorer histograms, and the runs'
    images side by side (same prompt and seed; ``roots`` are the folders the two runs' image paths are under)."""
    a, b = comparison["labels"]
    pairs = sidebyside.pair_rows(rows_a, rows_b)
    caches = (_Thumbs(roots[0]), _Thumbs(roots[1]))
    runs = comparison["runs"]
    body = ["<h1>diffalign eval: comparison</h1>", f"<p>{html.escape(a)}: {html.escape(runs[a])}<br>"]
    body.append(f"{html.escape(b)}: {html.escape(runs[b])}<br>shared prompts: {comparison['n_shared_prompts']}</p>")
    body.append(_html_table(*compare_rows(comparison), "summary"))
    body.append(
        f"<p>CI: {html.escape(comparison['ci_method'])}. Win rate: {html.escape(comparison['win_method'])}.</p>"
    )
    body += [f'<p class="note">{html.escape(n)}</p>' for n in comparison.get("notes") or []]
    for i, key in enumerate(comparison["scorers"]):
        series = [(a, [float(r[key]) for r in rows_a]), (b, [float(r[key]) for r in rows_b])]
        body.append(f'<section class="scorer" id="scorer-{i}"><h2>{html.escape(key)}</h2>')
        body.append(svg_histogram(series, title=f"{key} per image"))
        if pairs:
            body.append(f"<h3>Side by side: {html.escape(b)} | {html.escape(a)}, same prompt and seed</h3>")
            body.append(f'<p>PNG grid: <a href="{sidebyside.png_name(key)}">{sidebyside.png_name(key)}</a></p>')
            body.append(_side_by_side(pairs, key, (a, b), caches, thumbs))
        else:
            body.append('<p class="note">no image shows the same prompt and seed in both runs: no side-by-side</p>')
        body.append("</section>")
    return _page("diffalign eval comparison", "".join(body))


def write_compare_report(
    path: str | Path,
    comparison: Mapping[str, Any],
    rows_a: Sequence[Mapping[str, Any]],
    rows_b: Sequence[Mapping[str, Any]],
    *,
    roots: tuple[Path, Path] = (Path("."), Path(".")),
) -> Path:
    """The comparison page, and beside it one side-by-side PNG grid per scorer (``sidebyside.png_name``)."""
    path = Path(path)
    path.write_text(compare_report(comparison, rows_a, rows_b, roots=roots), encoding="utf-8")
    pairs = sidebyside.pair_rows(rows_a, rows_b)
    if pairs:
        labels = tuple(comparison["labels"])
        for key in comparison["scorers"]:
            sidebyside.write_png(path.parent / sidebyside.png_name(key), pairs, key, labels, roots)
    return path
