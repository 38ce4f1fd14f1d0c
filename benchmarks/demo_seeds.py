"""Summarise `make demo` runs at several seeds: per-seed headline numbers, mean ± sample std and
the range, with the machine and commit (README "What has been measured").

    python benchmarks/demo_seeds.py runs/demo runs/demo_s1 runs/demo_s2 --out benchmarks/results/demo/NAME
writes NAME.json and NAME.md. Each run folder is a finished pipeline run (summary.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _benchmeta import cpu_name, git_sha  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)

KEYS = (("seed_miou", "seeds"), ("crf_miou", "seeds + CRF"), ("mask_miou", "Masks (PSA)"),
        ("deeplab_miou", "DeepLab"), ("deeplab_crf_miou", "DeepLab + CRF"))


def run_row(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    seed = int(yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"])
    row = {"run": run.name, "seed": seed, **{k: summary[k] for k, _ in KEYS if k in summary}}
    row["seed_best_threshold"] = summary.get("seed_best_threshold")
    row["stage_seconds"] = {k: round(v, 1) for k, v in summary["stage_seconds"].items()}
    return row


def spread(values: list) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", required=True, help="output path without suffix (.json and .md are written)")
    ap.add_argument("--note", default="", help="free text kept in the files (e.g. how the machine was shared)")
    args = ap.parse_args(argv)
    rows = sorted((run_row(r) for r in args.runs), key=lambda r: r["seed"])
    stats = {k: spread([r[k] for r in rows]) for k, _ in KEYS if all(k in r for r in rows)}
    meta = {"git_commit": git_sha(), "cpu": cpu_name(), "note": args.note, "runs": rows, "stats": stats}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = [f"CPU: {meta['cpu']}; commit {meta['git_commit']}. {args.note}", "",
             "| | " + " | ".join(f"seed {r['seed']}" for r in rows) + " | mean ± sd | range |",
             "|---|" + "---|" * (len(rows) + 2)]
    for k, title in KEYS:
        if k in stats:
            s = stats[k]
            lines.append(f"| {title} | " + " | ".join(f"{r[k]:.2f}" for r in rows)
                         + f" | {s['mean']:.2f} ± {s['sd']:.2f} | {s['min']:.2f} - {s['max']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
