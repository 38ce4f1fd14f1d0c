"""One command-line policy for hsc_fast/cli/: every option has help, every --help ends with the
exit-status table, the shared flags come from common.py, and bad data input is exit 2 before work."""
from __future__ import annotations

import argparse
import importlib

import pytest

from hsc_fast.cli import common

MODULES = ("train_cam", "train_deeplab", "make_seeds", "pipeline", "pretrain", "ablation", "evaluate", "shard",
           "synth", "report", "doctor")
# Commands that train across ranks: a lost peer ends them with status 75.
DISTRIBUTED = {"train_cam", "train_deeplab", "pipeline", "ablation"}


def _parser(name: str) -> argparse.ArgumentParser:
    return importlib.import_module(f"hsc_fast.cli.{name}").build_parser()


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every option and positional of `parser`, without argparse's own -h/--help."""
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _action(parser: argparse.ArgumentParser, flag: str):
    return next((a for a in _options(parser) if flag in a.option_strings), None)


@pytest.mark.parametrize("name", MODULES)
def test_every_option_has_visible_help(name):
    options = _options(_parser(name))
    assert options, name
    for action in options:
        label = "/".join(action.option_strings) or action.dest
        assert isinstance(action.help, str) and action.help.strip(), f"{name} {label}: no help"
        assert action.help != argparse.SUPPRESS, f"{name} {label}: hidden from --help"


@pytest.mark.parametrize("name", MODULES)
def test_every_epilog_ends_with_the_exit_status_table(name):
    epilog = _parser(name).epilog or ""
    assert epilog.count("exit status:") == 1, f"{name}: one exit-status table, not {epilog.count('exit status:')}"
    table = epilog.split("exit status:", 1)[1]
    codes = [line.split()[0] for line in table.strip().splitlines()]
    expected = ["0", "1", "2"] + (["75"] if name in DISTRIBUTED else [])
    assert codes == expected, f"{name}: {codes}"
    assert epilog.rstrip().endswith(common.exit_codes_epilog(**_table_kwargs(name, table)).rstrip())


def _table_kwargs(name: str, table: str) -> dict:
    """The helper's arguments that rebuild `table` (what status 1 means is the command's own)."""
    failed = table.strip().splitlines()[1].split(None, 1)[1].removesuffix(" (or an unexpected error)")
    return {"failed": failed, "rank_lost": name in DISTRIBUTED}


@pytest.mark.parametrize("name", ["make_seeds", "evaluate"])
def test_no_progress_has_the_shared_help(name):
    action = _action(_parser(name), "--no-progress")
    assert action is not None and action.dest == "no_progress" and action.default is False
    assert action.help == common.PROGRESS_HELP


def test_shared_flags_come_from_common():
    """--set, --config, --no-progress and --local_rank: same dest, default and help wherever present."""
    with_set = {name: _action(_parser(name), "--set") for name in MODULES}
    with_set = {k: v for k, v in with_set.items() if v is not None}
    assert set(with_set) == {"train_cam", "train_deeplab", "make_seeds", "pipeline", "pretrain", "ablation"}
    for name, action in with_set.items():
        assert isinstance(action, argparse._AppendAction) and action.default == [], name
        assert action.metavar == "KEY=VALUE" and action.help.startswith(common.SET_HELP), name
        assert _action(_parser(name), "--config") is not None, name
    for flag, text in (("--no-progress", common.PROGRESS_HELP), ("--local_rank", common.LOCAL_RANK_HELP)):
        found = [_action(_parser(name), flag) for name in MODULES]
        found = [a for a in found if a is not None]
        assert len(found) >= 5, flag
        assert all(a.help == text for a in found), flag
    for name in ("train_cam", "train_deeplab"):
        assert _action(_parser(name), "--list-keys").help == common.LIST_KEYS_HELP
        assert _action(_parser(name), "--deepspeed_config").help == common.DS_CONFIG_HELP


def test_flag_names_and_defaults_are_kept():
    """README commands and tests use these; the shared helpers must not rename them."""
    cam = _parser("train_cam").parse_args([])
    assert (cam.config, cam.set, cam.list_keys, cam.no_progress, cam.local_rank) == ("hsc_eps_official", [],
                                                                                      False, False, -1)
    seeds = _parser("make_seeds").parse_args(["--data", "d", "--out", "o", "--local-rank", "3"])
    assert (seeds.config, seeds.local_rank, seeds.no_progress) == (None, 3, False)
    assert _parser("make_seeds").parse_args(["--data", "d", "--out", "o"]).local_rank is None
    assert _parser("ablation").parse_args(["--run-dir", "r"]).config == "ablation/demo"
    assert _parser("pretrain").parse_args(["--out", "w.pth"]).config == "demo_synthnet"


def _voc_without_jpegs(tmp_path):
    """A folder that looks like a VOC root (an id list, annotations) but has no JPEGImages/."""
    voc = tmp_path / "VOC2012"
    (voc / "Annotations").mkdir(parents=True)
    ids = voc / "ImageSets" / "Segmentation" / "train_aug.txt"
    ids.parent.mkdir(parents=True)
    ids.write_text("2007_000032\n")
    return voc, ids


def test_train_cam_on_a_folder_without_jpegimages_is_exit_2_before_any_work(tmp_path, capsys):
    from hsc_fast.cli.train_cam import main
    voc, ids = _voc_without_jpegs(tmp_path)
    run = tmp_path / "run"
    code = main(["--config", "demo", "--run-dir", str(run), "--data", str(voc), "--no-progress",
                 "--set", f"data.train_list={ids}", "--set", "data.sbd_root=", "--set", "data.cls_labels=",
                 "--set", "data.saliency_root=", "--set", "model.allow_random_init=true"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(voc) in err and "JPEGImages" in err, err
    assert not run.exists()  # no run folder, log, config copy or checkpoint was made


def test_make_seeds_on_a_folder_without_jpegimages_is_exit_2(tmp_path, capsys):
    from hsc_fast.cli.make_seeds import main
    voc, ids = _voc_without_jpegs(tmp_path)
    out = tmp_path / "out"
    code = main(["--data", str(voc), "--list", str(ids), "--out", str(out), "--stage", "crf", "--no-progress",
                 "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and str(voc) in err and "JPEGImages" in err, err
    assert not out.exists()


def test_report_of_a_missing_run_dir_is_exit_2(tmp_path, capsys):
    from hsc_fast.cli.report import main
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_readme_documents_the_exit_codes():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    for code in (common.EXIT_OK, common.EXIT_FAILED, common.EXIT_BAD_INPUT, common.EXIT_RANK_LOST):
        assert f"| `{code}` |" in section, code


ENTRY_POINTS = ("shard", "evaluate", "doctor", "report", "synth")


# Runs each `python -m hsc_fast.<name> --help` the way -m does (runpy, __main__) in ONE child
# process (one torch import, not five); prints {name: [exit status, stdout, stderr]} as JSON.
_RUN_HELPS = """
import contextlib, io, json, runpy, sys, warnings
warnings.simplefilter("always")
out = {}
for name in sys.argv[1:]:
    so, se, code = io.StringIO(), io.StringIO(), None
    sys.argv = [name, "--help"]
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        try:
            runpy.run_module("hsc_fast." + name, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
    out[name] = [code, so.getvalue(), se.getvalue()]
print(json.dumps(out))
"""


def test_package_entry_points_print_the_cli_help_without_deprecation(monkeypatch):
    """`python -m hsc_fast.<name> --help` is the documented interface: exit 0, exactly the help of
    hsc_fast.cli.<name> (same prog: its console script hsc-<name>), no deprecation note or warning."""
    import json
    import os
    import subprocess
    import sys
    monkeypatch.setenv("COLUMNS", "100")
    done = subprocess.run([sys.executable, "-c", _RUN_HELPS, *ENTRY_POINTS], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "100"})
    assert done.returncode == 0, done.stderr[-2000:]
    helps = json.loads(done.stdout.splitlines()[-1])
    for name in ENTRY_POINTS:
        code, out, err = helps[name]
        assert code == 0, (name, err[-2000:])
        assert out == _parser(name).format_help(), name
        assert out.startswith(f"usage: hsc-{name} "), name
        text = (out + err).lower()
        assert "deprecat" not in text and "removed in" not in text and "old path" not in text, (name, err)
        module_doc = importlib.import_module(f"hsc_fast.{name}").__doc__.lower()
        assert "old path" not in module_doc and "removed" not in module_doc, name


def test_console_scripts_name_each_entry_point():
    """setup.py declares hsc-<name> = hsc_fast.cli.<name>:main for every package entry point."""
    import re
    from pathlib import Path
    setup = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    declared = dict(re.findall(r'"(hsc-[a-z_]+)=(hsc_fast\.cli\.[a-z_]+):main"', setup))
    for name in ENTRY_POINTS:
        assert declared.get(f"hsc-{name}") == f"hsc_fast.cli.{name}", name
        assert callable(importlib.import_module(f"hsc_fast.cli.{name}").main)
