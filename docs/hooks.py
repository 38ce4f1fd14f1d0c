"""MkDocs hooks: the pages' generated parts, made at build time so nothing generated is committed.

Markers (HTML comments, so a page reads sensibly in a plain markdown viewer too):

- ``<!-- hsc:config-reference -->``: the config reference table, ``hsc_fast.config.markdown_reference()``.
- ``<!-- hsc:results -->``: every ``benchmarks/results/**/*.md`` file, each in a collapsible block.
- ``<!-- hsc:sweep-curve PATH -->``: the threshold-sweep curve of a ``sweep.json`` (PATH relative to
  docs/) as an inline SVG line chart; a note when the file is not there yet.
- ``<!-- hsc:demo-gallery -->``: the demo pictures found in docs/img/demo/ (see DEMO_PICTURES); the
  ones not there yet are listed by name, so the strict build never sees a broken image link.
"""
from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
RESULTS = REPO / "benchmarks" / "results"
MARKER = re.compile(r"<!-- hsc:([a-z-]+)(?: ([^ ]+))? -->")

# docs/img/demo/<prefix>*.{jpg,png} -> caption. Copied from a `make demo` run (docs/make_demo_pictures.py).
DEMO_PICTURES = {
    "seeds_": "image | CAM (max over classes) | seeds | seeds + CRF (runs/demo/seeds/overlays/)",
    "masks_": "image | seeds + CRF | Masks (PSA random walk) | ground truth",
    "deeplab_": "image | DeepLab | DeepLab + CRF | ground truth (val split)",
}


def _config_reference(_arg: str, _page) -> str:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from hsc_fast.config import markdown_reference
    return markdown_reference()


def _indent(text: str, pad: str = "    ") -> str:
    return "\n".join(pad + line if line.strip() else "" for line in text.splitlines())


def _demote_headings(text: str) -> str:
    """A results file's own headings become bold lines: they must not enter the page's outline."""
    return re.sub(r"^#{1,6} +(.+)$", r"**\1**", text, flags=re.M)


def _results(_arg: str, _page) -> str:
    blocks = []
    for path in sorted(RESULTS.rglob("*.md")):
        rel = path.relative_to(REPO).as_posix()
        body = _demote_headings(path.read_text(encoding="utf-8").strip())
        blocks.append(f'??? abstract "`{rel}`"\n\n{_indent(body)}\n')
    return "\n".join(blocks) if blocks else "*(no result files in benchmarks/results/)*"


def sweep_svg(curve: list[dict], best: dict | None, width: int = 640, height: int = 360) -> str:
    """mIoU against the background threshold as an SVG line chart (axes, ticks, the best point)."""
    points = [(float(c["threshold"]), float(c["miou"])) for c in curve if c.get("miou") is not None]
    if not points:
        return "<p><em>(the sweep curve is empty)</em></p>"
    left, right, top, bottom = 56, 16, 16, 44
    t_lo, t_hi = min(p[0] for p in points), max(p[0] for p in points)
    t_hi = t_hi if t_hi > t_lo else t_lo + 1.0
    m_lo = 5 * int(min(p[1] for p in points) // 5)
    m_hi = 5 * (int(max(p[1] for p in points) // 5) + 1)

    def x(t):
        return left + (t - t_lo) / (t_hi - t_lo) * (width - left - right)

    def y(m):
        return height - bottom - (m - m_lo) / (m_hi - m_lo) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             'role="img" aria-label="seed mIoU against the background threshold" font-size="12" '
             'font-family="sans-serif">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    for m in range(m_lo, m_hi + 1, 5):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(m):.1f}" y2="{y(m):.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y(m) + 4:.1f}" text-anchor="end">{m}</text>')
    n_ticks = 6
    for i in range(n_ticks + 1):
        t = t_lo + i * (t_hi - t_lo) / n_ticks
        parts.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{height - bottom}" y2="{height - bottom + 4}" '
                     f'stroke="black"/><text x="{x(t):.1f}" y="{height - bottom + 18}" text-anchor="middle">'
                     f'{t:.2f}</text>')
    parts.append(f'<polyline fill="none" stroke="black" points="{left},{top} {left},{height - bottom} '
                 f'{width - right},{height - bottom}"/>')
    path = " ".join(f"{x(t):.1f},{y(m):.1f}" for t, m in points)
    parts.append(f'<polyline fill="none" stroke="#3f51b5" stroke-width="2" points="{path}"/>')
    if best:
        bt, bm = float(best["threshold"]), float(best["miou"])
        parts.append(f'<circle cx="{x(bt):.1f}" cy="{y(bm):.1f}" r="5" fill="#e91e63"/>'
                     f'<text x="{x(bt) + 8:.1f}" y="{y(bm) - 8:.1f}">best {bm:.2f} at {bt:.2f}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" text-anchor="middle">'
                 'background threshold</text>')
    parts.append(f'<text transform="translate(14 {(top + height - bottom) / 2:.0f}) rotate(-90)" '
                 'text-anchor="middle">seed mIoU (%)</text></svg>')
    return "".join(parts)


def _sweep_curve(arg: str, _page) -> str:
    path = DOCS / arg
    if not path.is_file():
        return (f'!!! note "Not generated yet"\n    The curve is drawn from `docs/{arg}` (a copy of '
                "`runs/demo/seeds/sweep.json` after `make demo`), which is not in this checkout yet.\n")
    data = json.loads(path.read_text(encoding="utf-8"))
    return f'<figure markdown="0">{sweep_svg(data.get("curve", []), data.get("best"))}</figure>\n'


def _demo_gallery(_arg: str, page) -> str:
    folder = DOCS / "img" / "demo"
    depth = page.file.src_uri.count("/")
    prefix_path = "../" * depth + "img/demo/"
    out, missing = [], []
    for prefix, caption in DEMO_PICTURES.items():
        found = sorted(p for p in folder.glob(f"{prefix}*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not found:
            missing.append(f"`docs/img/demo/{prefix}*.jpg` ({caption})")
            continue
        out.append(f"**{html.escape(caption)}**\n")
        out += [f"![{p.stem}]({prefix_path}{p.name})\n" for p in found]
    if missing:
        out.append('!!! note "Pictures not generated yet"\n    Made from a `make demo` run by '
                   "`python docs/make_demo_pictures.py runs/demo`; missing here:\n\n"
                   + "\n".join(f"    - {m}" for m in missing) + "\n")
    return "\n".join(out)


HANDLERS = {"config-reference": _config_reference, "results": _results, "sweep-curve": _sweep_curve,
            "demo-gallery": _demo_gallery}


def on_page_markdown(markdown: str, page, config, files) -> str:
    def replace(m: re.Match) -> str:
        handler = HANDLERS.get(m.group(1))
        if handler is None:
            raise ValueError(f"{page.file.src_uri}: unknown marker {m.group(0)}")
        return handler(m.group(2) or "", page)
    return MARKER.sub(replace, markdown)
