"""The documentation site builds strictly (no broken link, no page missing from the navigation, no
warning of any plugin) and its generated parts come from the code: the config reference from the
config dataclasses, the benchmark tables from benchmarks/results/."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from hsc_fast.config import describe, markdown_reference
from hsc_fast.engine.pipeline import STAGES

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"

pytest.importorskip("mkdocs", reason="the docs extra is not installed (make setup installs it)")


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    return SimpleNamespace(dir=out, returncode=proc.returncode, log=log)


def test_site_builds_strictly_without_warnings(site):
    warnings = [line for line in site.log.splitlines() if re.match(r"^(WARNING|ERROR)\b", line)]
    assert site.returncode == 0 and not warnings, site.log[-4000:]


def test_config_reference_page_is_generated_and_lists_every_key(site):
    page = DOCS / "reference" / "config-keys.md"
    source = page.read_text()
    assert "| key | type | default | meaning |" not in source, "generated text committed: keep only the marker"
    hooks = _hooks()
    fake = SimpleNamespace(file=SimpleNamespace(src_uri="reference/config-keys.md"))
    assert markdown_reference() in hooks.on_page_markdown(source, fake, None, None)
    html = (site.dir / "reference" / "config-keys" / "index.html").read_text()
    for key, *_ in describe():
        assert f"<code>{key}</code>" in html, key


def test_benchmark_page_shows_every_result_file(site):
    html = (site.dir / "results" / "benchmarks" / "index.html").read_text()
    files = sorted((REPO / "benchmarks" / "results").rglob("*.md"))
    assert files
    for path in files:
        assert path.relative_to(REPO).as_posix() in html, path


def test_every_pipeline_stage_is_documented():
    text = (DOCS / "pipeline.md").read_text() + (DOCS / "stages" / "index.md").read_text()
    for stage in STAGES[1:]:
        assert f"{stage}" in text, stage


def test_sweep_curve_svg_has_one_vertex_per_threshold_and_marks_the_best():
    hooks = _hooks()
    curve = [{"threshold": t / 100, "miou": 20 + t - (t * t) / 40} for t in range(0, 60, 5)]
    best = max(curve, key=lambda c: c["miou"])
    svg = hooks.sweep_svg(curve, best)
    line = re.search(r'<polyline fill="none" stroke="#3f51b5"[^>]* points="([^"]+)"', svg).group(1)
    xs = [float(p.split(",")[0]) for p in line.split()]
    assert len(xs) == len(curve) and xs == sorted(xs)
    assert f"best {best['miou']:.2f} at {best['threshold']:.2f}" in svg
