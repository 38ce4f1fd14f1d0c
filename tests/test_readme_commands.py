"""README's commands run as written, and the documentation site's commands parse.

Every command of our own tools in README's and the site's (docs/**/*.md) code blocks (``python launch/X.py``, ``python -m
hsc_fast...``, ``deepspeed``/``torchrun``/``srun`` launching launch/X.py, the ``hsc-*`` console
scripts) is parsed with its tool's own ``build_parser()`` (unknown flags and typos fail), its
``--config`` must name a preset or file and its ``--set`` keys must exist (``load_config``), and a
training command must not stop at the random-init guard (exit 2 for every user who copies it).

The slow test then runs README's shard -> 2-rank CPU CAM training -> seeds -> evaluate
commands on a tiny synthetic set: the README's own argv, with data/ and runs/ paths moved to a
temporary folder, the port made free and tiny budgets appended as ``--set``. Not executed here
(parsed only): anything with ``--num_gpus 8``/8 GPUs as the launcher (run with plain python
instead, the same tool argv), multi-node / Slurm / hostfile lines, ``hsc-doctor`` (its own tests),
``launch/pipeline.py`` on real VOC and DeepLab on real VOC (the demo pipeline test covers them).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from hsc_fast.config import load_config

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
SITE_PAGES = sorted(p for p in (REPO / "docs").rglob("*.md") if "_incoming" not in p.parts)
CONSOLE_SCRIPTS = dict(re.findall(r'"(hsc-[a-z]+)=hsc_fast\.cli\.([a-z_]+):main"', (REPO / "setup.py").read_text()))
LAUNCHERS = {"deepspeed", "torchrun"}
PYTHONS = {"python", "python3", ".venv/bin/python", "$(PY)"}


@dataclass
class Command:
    line: int          # README line of the command's first line
    text: str          # the command as written (continuations joined)
    launcher: str      # "python" | "deepspeed" | "torchrun" | "console"
    module: str        # hsc_fast.cli.X
    argv: list         # the tool's own arguments ("..." elisions dropped)
    where: str = "README"  # the file (README or a docs/ page)


def code_blocks(text: str):
    """(first line number, lines) of every fenced block (```bash and plain ```)."""
    lines, block, start = text.splitlines(), None, 0
    for n, line in enumerate(lines, 1):
        if line.startswith("```"):
            if block is None:
                block, start = [], n + 1
            else:
                yield start, block
                block = None
        elif block is not None:
            block.append(line)


def shell_lines(start: int, block: list):
    """(line number, text) of the block's shell commands: continuations joined, heredoc bodies
    dropped."""
    out, buf, first, heredoc = [], "", None, None
    for n, line in enumerate(block, start):
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        m = re.search(r"<<-?\s*'?(\w+)'?", line)
        if m:
            heredoc = m.group(1)
        first = n if first is None else first
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((first, buf + line))
        buf, first = "", None
    return out


def _module_of(token: str):
    """launch/X.py -> hsc_fast.cli.X; hsc_fast.X (the stable entry point) / hsc_fast.cli.X -> hsc_fast.cli.X."""
    if token.endswith(".py"):
        name = Path(token).stem
        return f"hsc_fast.cli.{name}" if token.startswith("launch/") else None
    if token.startswith("hsc_fast.cli."):
        return token
    if token.startswith("hsc_fast."):
        alias = REPO / (token.replace(".", "/") + ".py")
        m = alias.is_file() and re.search(r"from (hsc_fast\.cli\.\w+) import main", alias.read_text())
        return m.group(1) if m else token    # not a command alias (e.g. hsc_fast.config): kept as is
    return None


def parse_command(n: int, text: str):
    """A Command when `text` runs one of our tools, else None."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        tokens = list(lex)
    except ValueError:
        return None
    # the first simple command of a list / pipeline (a && b: each part is its own command)
    cmds, cur = [], []
    for t in tokens:
        if set(t) <= set(";&|"):
            cmds.append(cur)
            cur = []
        else:
            cur.append(t)
    cmds.append(cur)
    found = []
    for toks in cmds:
        toks = [t for t in toks if t != "..."]
        while toks and (re.match(r"^[A-Z_][A-Z0-9_]*=", toks[0]) or toks[0] in ("srun", "env")):
            toks = toks[1:]
        if not toks:
            continue
        head = toks[0]
        if head in CONSOLE_SCRIPTS:
            found.append(Command(n, text, "console", f"hsc_fast.cli.{CONSOLE_SCRIPTS[head]}", toks[1:]))
        elif head in PYTHONS and len(toks) > 1:
            if toks[1] == "-m" and len(toks) > 2 and (mod := _module_of(toks[2])):
                found.append(Command(n, text, "python", mod, toks[3:]))
            elif (mod := _module_of(toks[1])):
                found.append(Command(n, text, "python", mod, toks[2:]))
        elif head in LAUNCHERS:
            script = next((i for i, t in enumerate(toks) if t.endswith(".py")), None)
            if script is not None and (mod := _module_of(toks[script])):
                found.append(Command(n, text, head, mod, toks[script + 1:]))
    return found


def commands_of(text: str, where: str = "README") -> list:
    cmds = []
    for start, block in code_blocks(text):
        for n, text_ in shell_lines(start, block):
            for c in parse_command(n, text_) or []:
                c.where = where
                cmds.append(c)
    return cmds


COMMANDS = commands_of(README)
SITE_COMMANDS = [c for page in SITE_PAGES for c in commands_of(page.read_text(), page.relative_to(REPO).as_posix())]


def test_the_extractor_finds_the_commands_readme_and_the_site_document():
    # README: the quick start (VOC + SBD to Masks and DeepLab) and the CPU stages the slow test runs
    modules = {c.module for c in COMMANDS}
    for name in ("shard", "train_cam", "make_seeds", "refine", "evaluate", "train_deeplab", "pipeline", "doctor"):
        assert f"hsc_fast.cli.{name}" in modules, name
    assert any(c.launcher == "deepspeed" for c in COMMANDS)
    assert len(COMMANDS) >= 11  # 318f9a0 dropped the pretrain line of the CPU stages
    # the site: every tool, both launchers
    site = {c.module for c in SITE_COMMANDS}
    for name in ("shard", "train_cam", "make_seeds", "refine", "evaluate", "train_deeplab", "pipeline", "pretrain",
                 "doctor", "report"):
        assert f"hsc_fast.cli.{name}" in site, name
    assert any(c.launcher == "torchrun" for c in SITE_COMMANDS) and any(c.launcher == "deepspeed" for c in SITE_COMMANDS)
    assert len(SITE_COMMANDS) >= 20


def _parse(cmd: Command) -> argparse.Namespace:
    mod = importlib.import_module(cmd.module)
    parser = mod.build_parser()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return parser.parse_args(cmd.argv)
        except SystemExit as e:
            pytest.fail(f"{cmd.where} line {cmd.line}: `{cmd.text.strip()}` does not parse "
                        f"(exit {e.code}): {err.getvalue().strip()[-500:]}")


def _cli_commands():
    return [pytest.param(c, id=f"{c.where}-L{c.line}-{c.module.rsplit('.', 1)[-1]}") for c in COMMANDS + SITE_COMMANDS
            if c.module.startswith("hsc_fast.cli.")]


@pytest.mark.parametrize("cmd", _cli_commands())
def test_readme_command_parses_and_its_config_loads(cmd):
    args = _parse(cmd)
    if hasattr(args, "set"):
        config = getattr(args, "config", None)
        if config is None and getattr(args, "demo", False):
            config = "demo"
        try:
            cfg = load_config(config, list(args.set))
        except Exception as e:  # ConfigError names the key / preset
            pytest.fail(f"{cmd.where} line {cmd.line}: `{cmd.text.strip()}`: {type(e).__name__}: {e}")
        name = cmd.module.rsplit(".", 1)[-1]
        # The guard every user of a copied training command meets first (exit 2): weights or random init.
        if name == "train_cam" and getattr(args, "list_keys", False) is False:
            assert cfg.model.weights or cfg.model.allow_random_init, (
                f"{cmd.where} line {cmd.line}: `{cmd.text.strip()}` stops with exit 2: model.weights is empty "
                "and model.allow_random_init is false")
        if name == "train_deeplab":
            assert cfg.deeplab.weights or cfg.deeplab.allow_random_init, (
                f"{cmd.where} line {cmd.line}: `{cmd.text.strip()}`: deeplab.weights is empty")


def test_non_cli_modules_readme_runs_exist():
    for c in COMMANDS + SITE_COMMANDS:
        if not c.module.startswith("hsc_fast.cli."):
            assert importlib.util.find_spec(c.module) is not None, (c.where, c.line, c.text)


def test_readme_seed_commands_evaluate_only_ids_with_ground_truth():
    """make_seeds evaluates (sweep, CRF) every id of its --list against --gt, and a missing mask is
    an error: README's --gt runs must use the VOC train list, not train_aug (10,582 ids, 1,464 masks)."""
    seeds = [c for c in COMMANDS + SITE_COMMANDS if c.module == "hsc_fast.cli.make_seeds"]
    assert seeds
    for c in seeds:
        args = _parse(c)
        if args.gt:
            assert args.list is None or not args.list.endswith("train_aug.txt"), (c.where, c.line, c.text)


# ------------------------------------------------------------------------------ executed (slow)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one(module: str, pred=lambda c: True) -> Command:
    found = [c for c in COMMANDS if c.module == f"hsc_fast.cli.{module}" and pred(c)]
    assert found, module
    return found[0]


def _run(cmd: list, tmp: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{shlex.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    return proc


TINY_CAM = ["data.resize_long=[64,80]", "data.crop_size=64", "data.view2_size=32", "loss.contrast_size=4",
            "loss.csc_topk=8", "loss.csc_update_topk=4", "loss.psc_topk=2", "data.batch_size=2",
            "train.max_steps=2", "train.save_every=2", "train.log_every=1", "seeds.scales=[1.0]",
            "seeds.crf.alpha_grid=[4]"]


def _sets(values):
    return [x for v in values for x in ("--set", v)]


@pytest.mark.slow
def test_readme_stage_commands_run_on_the_synthetic_set(tmp_path):
    """shard -> 2-rank CPU train_cam (deepspeed, as README writes it) -> make_seeds ->
    evaluate, each README command with its paths moved under tmp_path (same relative layout: the
    commands run with cwd=tmp_path) and tiny budgets appended."""
    from hsc_fast.data.synth import generate
    tmp = tmp_path
    generate(tmp / "synth", 16, 4, 0, 64)
    # README's data/ layout, pointing at the synthetic tree
    data = tmp / "data"
    data.mkdir()
    for src, dst in (("synth/VOC2012", "VOC2012"), ("synth/SBD", "SBD"), ("synth/cls_labels.npy", "cls_labels.npy"),
                     ("synth/SaliencyMaps", "SALImages")):
        os.symlink(tmp / src, data / dst)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    py = [sys.executable]

    # 1. shards (README: data/shards/train_aug), then --verify
    shard = _one("shard", lambda c: "--out" in c.argv)
    _run(py + ["-m", shard.module, *shard.argv, "--workers", "1", "--quiet"], tmp, env)
    verify = _one("shard", lambda c: "--verify" in c.argv)
    _run(py + ["-m", verify.module, *verify.argv], tmp, env)
    index = "data/shards/train_aug/index.json"
    assert (tmp / index).is_file()

    # 2. the 2-rank CPU CAM training as README writes it (the demo preset: Lite0 from its wheel);
    #    make demo's shards (runs/demo/shards) are the ones made above
    cam = _one("train_cam", lambda c: "--config demo" in c.text and c.launcher == "deepspeed")
    (tmp / "runs/demo").mkdir(parents=True)
    os.symlink(tmp / "data/shards/train_aug", tmp / "runs/demo/shards")
    ds = cam.text.split("launch/train_cam.py")[0].split()
    ds = [t for t in ds if "=" not in t or t.startswith("-")]
    ds[ds.index("--master_port") + 1] = str(_free_port())
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    _run([deepspeed, *ds[1:], str(REPO / "launch/train_cam.py"), *cam.argv, *_sets(TINY_CAM), "--no-progress"],
         tmp, env, timeout=400)
    run_dir = Path(cam.argv[cam.argv.index("--run-dir") + 1])
    assert (tmp / run_dir / "final/model.pt").is_file()

    # 3. seeds: README's make_seeds argv (its 8-GPU launcher replaced by one plain process); README's
    #    runs/hsc_eps is the run just trained
    os.symlink(tmp / run_dir, tmp / "runs/hsc_eps")
    for c in [c for c in COMMANDS if c.module == "hsc_fast.cli.make_seeds"]:
        _run(py + [str(REPO / "launch/make_seeds.py"), *c.argv, "--workers", "1", "--no-progress"], tmp, env)
    seeds = tmp / "runs/hsc_eps/seeds"
    n_train = len((tmp / "data/VOC2012/ImageSets/Segmentation/train_aug.txt").read_text().split())
    assert len(list((seeds / "pseudo_labels").glob("*.png"))) == n_train
    assert (seeds / "sweep.json").is_file()

    # 4. README's evaluate command on those CAMs
    ev = _one("evaluate", lambda c: "--cam" in c.argv)
    out = _run(py + ["-m", ev.module, *ev.argv, "--workers", "1", "--no-progress"], tmp, env)
    assert "best background threshold" in out.stdout and (tmp / "sweep.json").is_file()
