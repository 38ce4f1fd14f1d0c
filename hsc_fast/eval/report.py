"""The run report: `report.md` and `report.html` in the run directory.

Built only from files the stages wrote (summary.json, the evaluation JSONs, the curve PNG, the
overlay pictures and classes.json), so it can be regenerated at any time:
`python -m hsc_fast.report RUN_DIR`. The per-class IoU table has one row per label name of the
evaluations (K+1: 21 for VOC, 81 for COCO), in label order; the class set's line names K.
"""
from __future__ import annotations

from hsc_fast.io import atomic_write_text

import html
import json
from pathlib import Path
from typing import Optional

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
HEADLINES = (("seed_miou", "Seeds (best background threshold)"), ("crf_miou", "Seeds + CRF (pseudo-labels)"),
             ("mask_miou", "Masks (PSA / AffinityNet random walk)"),
             ("deeplab_miou", "DeepLab"), ("deeplab_crf_miou", "DeepLab + CRF"))


def _load_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _classes_line(run_dir: Path) -> Optional[str]:
    """'Classes: coco (80 foreground classes + background)' from RUN_DIR/classes.json, if any."""
    path = run_dir / "classes.json"
    if not path.is_file():
        return None
    from hsc_fast.classes import load
    from hsc_fast.errors import DataError
    try:
        cs = load(path)
    except DataError as e:
        return f"Classes: unreadable {path.name} ({e})"
    return f"Classes: {cs.name} ({cs.num_fg} foreground classes + background)"


def _iou_table(evals: dict[str, dict]) -> list[list[str]]:
    """Rows: class (every label name of the evaluations, in their order), then one column per
    evaluation (percent IoU)."""
    names: list[str] = []
    for result in evals.values():
        for name in result.get("iou", {}):
            if name not in names:
                names.append(name)
    rows = [["class"] + list(evals)]
    for name in names:
        rows.append([name] + [_pct(r.get("iou", {}).get(name)) for r in evals.values()])
    rows.append(["**mIoU**"] + [_pct(r.get("miou")) for r in evals.values()])
    return rows


def _pct(v) -> str:
    return "-" if v is None else f"{float(v):.2f}"


def _md_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip('*'))}</td>" for c in r) + "</tr>"
                   for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def collect(run_dir: Path) -> dict:
    """Everything the report shows, as paths relative to the run dir."""
    run_dir = Path(run_dir)
    summary = _load_json(run_dir / "summary.json") or {}
    evals = {}
    for label, rel in (("seeds", summary.get("seed_eval")), ("seeds+CRF", summary.get("crf_eval")),
                       ("Masks", summary.get("mask_eval")),
                       ("DeepLab", summary.get("deeplab_eval")), ("DeepLab+CRF", summary.get("deeplab_crf_eval"))):
        result = _load_json(run_dir / rel) if rel else None
        if result:
            evals[label] = result
    pictures = []
    for folder in summary.get("overlay_dirs", []):
        found = [p for p in (run_dir / folder).glob("*") if p.suffix.lower() in PICTURE_SUFFIXES]
        pictures += sorted(str(p.relative_to(run_dir)) for p in found)[:8]
    curve = summary.get("curve_png")
    return {"summary": summary, "evals": evals, "pictures": pictures,
            "curve": curve if curve and (run_dir / curve).is_file() else None,
            "classes": _classes_line(run_dir),
            "config": (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""}


def backbone_lines(summary: dict) -> list[str]:
    """One sentence per SynthNet backbone the run pretrained (summary keys pretrain_<arch>_top1)."""
    return [f"Backbone initialisation: SynthNet {key[len('pretrain_'):-len('_top1')]}, top-1 {value:.1f} % on "
            f"held-out single-object synthetic images (chance 5.0 %); see pretrain/."
            for key, value in sorted(summary.items()) if key.startswith("pretrain_") and key.endswith("_top1")]


def stage_lines(summary: dict) -> list[str]:
    """How the seeds and the CRF were chosen: the best threshold (and the sweep's extensions),
    the CRF background alpha."""
    out = []
    if "seed_best_threshold" in summary:
        line = f"Best background threshold: {summary['seed_best_threshold']:.2f}"
        if summary.get("seed_sweep_extensions"):
            line += (f" (the sweep peaked at an end and was extended to {summary['seed_sweep_range']}: "
                     f"{', '.join(summary['seed_sweep_extensions'])})")
        out.append(line)
    if "crf_alpha" in summary:
        out.append(f"CRF background (1 - max fg)^alpha with alpha {summary['crf_alpha']:g}")
    return out


def render_markdown(info: dict) -> str:
    s = info["summary"]
    lines = ["# hsc-fast run report", ""]
    if s.get("dataset"):
        lines += [f"Dataset: {s['dataset']}", ""]
    if info.get("classes"):
        lines += [info["classes"], ""]
    lines += ["## Headline (mIoU %)", "", "| stage | mIoU | on |", "|---|---|---|"]
    for key, title in HEADLINES:
        if key in s:
            lines.append(f"| {title} | {_pct(s[key])} | {s.get(key.replace('miou', 'split'), '')} |")
    lines += [""] + [f"{line}  " for line in stage_lines(s)]
    for line in backbone_lines(s):
        lines += ["", line]
    lines += ["", "## Stage times", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in s.get("stage_seconds", {}).items()]
    if info["curve"]:
        lines += ["", "## Threshold sweep", "", f"![threshold curve]({info['curve']})"]
    if info["evals"]:
        lines += ["", "## Per-class IoU (%)", "", _md_table(_iou_table(info["evals"]))]
    if info["pictures"]:
        lines += ["", "## CAMs, seeds and pseudo-labels", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in info["pictures"]]
    lines += ["", "## Configuration", "", "```yaml", info["config"].rstrip(), "```", ""]
    return "\n".join(lines)


def render_html(info: dict) -> str:
    s = info["summary"]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>hsc-fast report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}</style>"
             "</head><body><h1>hsc-fast run report</h1>"]
    if info.get("classes"):
        parts.append(f"<p>{html.escape(info['classes'])}</p>")
    rows = [["stage", "mIoU (%)"]] + [[t, _pct(s[k])] for k, t in HEADLINES if k in s]
    parts += ["<h2>Headline</h2>", _html_table(rows)]
    parts += [f"<p>{html.escape(line)}</p>" for line in stage_lines(s) + backbone_lines(s)]
    times = [["stage", "seconds"]] + [[k, f"{v:.1f}"] for k, v in s.get("stage_seconds", {}).items()]
    parts += ["<h2>Stage times</h2>", _html_table(times)]
    if info["curve"]:
        parts += ["<h2>Threshold sweep</h2>", f"<img src='{html.escape(info['curve'])}'>"]
    if info["evals"]:
        parts += ["<h2>Per-class IoU (%)</h2>", _html_table(_iou_table(info["evals"]))]
    if info["pictures"]:
        parts += ["<h2>CAMs, seeds and pseudo-labels</h2>"]
        parts += [f"<figure><img src='{html.escape(p)}'><figcaption>{html.escape(Path(p).stem)}</figcaption></figure>"
                  for p in info["pictures"]]
    parts += ["<h2>Configuration</h2>", f"<pre>{html.escape(info['config'])}</pre>", "</body></html>"]
    return "\n".join(parts)


def write_report(run_dir) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    info = collect(run_dir)
    md, page = run_dir / "report.md", run_dir / "report.html"
    for path, text in ((md, render_markdown(info)), (page, render_html(info))):
        atomic_write_text(path, text)
    return md, page
