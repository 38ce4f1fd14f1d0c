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
    assert _parser("pretrain").parse_args(["--out", "w.pth"]).config == "demo"


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
