"""Untrusted files: checkpoints and weights are loaded with weights_only=True (a pickle that runs
code is refused and never runs), no code path unpickles user data, and paths taken from lists,
label files and shard indexes cannot leave their root."""
import ast
import json
import os
from pathlib import Path

import pytest
import torch

import _faultutil as F
from hsc_fast import checkpoint as C
from hsc_fast.config import DataConfig, ModelConfig
from hsc_fast.data import FolderDataset, build_train_loader
from hsc_fast.errors import DataError, WeightsError
from hsc_fast.data.shard import verify_shards
from hsc_fast.data.voc import load_cls_labels, read_id_list

SOURCE_DIRS = ("hsc_fast", "launch", "kernels", "benchmarks")
WDS_DECODERS = ("torch", "pil", "pilrgb", "rgb8", "l8", "torchrgb", "numpy")


class _Payload:
    """Unpickling this creates `path` (the proof that code ran)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_file(path: Path, marker: Path, wrap=lambda x: x) -> Path:
    torch.save(wrap({"conv.weight": torch.zeros(1), "x": _Payload(marker)}), path)
    return path


# ------------------------------------------------------------------------------ static guarantees
def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)  # the dotted name, e.g. "torch.jit.load"


def _kw(node, key):
    return next((k.value for k in node.keywords if k.arg == key), None)


def _is_true(value) -> bool:
    return isinstance(value, ast.Constant) and value.value is True


def _unsafe_calls(source: str, path: str) -> list:
    """Calls in `source` that could unpickle (run code from) a user file."""
    problems = []
    for node, name in _calls(ast.parse(source)):
        where = f"{path}:{node.lineno}"
        if name == "torch.load" and not _is_true(_kw(node, "weights_only")):
            problems.append(f"{where}: torch.load without weights_only=True")
        if name in ("pickle.load", "pickle.loads", "marshal.load", "marshal.loads", "yaml.load",
                    "yaml.unsafe_load", "yaml.full_load", "torch.jit.load", "dill.load", "dill.loads"):
            problems.append(f"{where}: {name}")
        if name in ("np.load", "numpy.load") and _is_true(_kw(node, "allow_pickle")):
            problems.append(f"{where}: np.load(allow_pickle=True)")
        if name in ("wds.decode", "wds.autodecode", "wds.Decoder", "wds.torch_loads") or (
                isinstance(node.func, ast.Attribute) and node.func.attr == "decode"
                and any(isinstance(a, ast.Constant) and a.value in WDS_DECODERS for a in node.args)):
            problems.append(f"{where}: webdataset decoding (its default handlers unpickle .pyd members)")
    return problems


def test_the_scanner_finds_unsafe_calls():
    bad = ("torch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\nnp.load(p, allow_pickle=True)\n"
           "yaml.load(t)\nds.decode('torch')\nwds.decode()\ntorch.jit.load(p)\n")
    good = "torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p)\nb.decode('utf-8')\nyaml.safe_load(t)\n"
    assert [p.split(":")[1] for p in _unsafe_calls(bad, "x.py")] == [str(i) for i in range(1, 9)]
    assert _unsafe_calls(good, "y.py") == []


def test_no_code_path_can_unpickle_user_files():
    """Every torch.load passes weights_only=True; no pickle.load(s), np.load(allow_pickle=True),
    yaml.load/unsafe_load, marshal or webdataset auto-decoding (which unpickles .pyd members)."""
    files = [p for d in SOURCE_DIRS for p in (F.REPO / d).rglob("*.py")]
    assert len(files) > 20
    problems = [msg for path in files for msg in _unsafe_calls(path.read_text(), str(path.relative_to(F.REPO)))]
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- checkpoints / weights
def test_checkpoint_files_that_would_run_code_are_refused(tmp_path):
    """A complete-marked checkpoint folder whose files carry a code-running pickle."""
    marker = tmp_path / "pwned"
    d = C.step_dir(tmp_path / "run", 2)
    d.mkdir(parents=True)
    _evil_file(d / C.SHARED_FILE, marker)
    _evil_file(C.rank_file(d, 0), marker)
    (d / C.COMPLETE_MARKER).write_text("2\n")
    for load in (lambda: C.load_shared(d), lambda: C.load_rank(d, 0, 1)):
        with pytest.raises(WeightsError):
            load()
    assert not marker.exists()


@pytest.mark.parametrize("wrap", [lambda x: x, lambda x: {"state_dict": x}, lambda x: {"model": x}])
def test_pretrained_weights_that_would_run_code_are_refused(tmp_path, wrap):
    from hsc_fast.models import build_cam_model
    marker = tmp_path / "pwned"
    model = build_cam_model(ModelConfig(backbone="resnet18", rsc_dim=16, psc_dim=8, allow_random_init=True))
    with pytest.raises(WeightsError, match="weights_only"):
        model.load_pretrained(_evil_file(tmp_path / "imagenet.pth", marker, wrap))
    assert not marker.exists()


# ------------------------------------------------------------------------------- paths from files
def test_shard_index_cannot_point_outside_its_folder(tmp_path):
    outside = tmp_path / "outside.tar"
    outside.write_bytes(b"")
    inside = tmp_path / "shards"
    inside.mkdir()
    for name in ("../outside.tar", str(outside), "sub/../../outside.tar"):
        (inside / "index.json").write_text(json.dumps({"shards": [{"file": name, "ids": ["a"], "sha256": ""}]}))
        with pytest.raises(DataError, match="escape|relative"):
            build_train_loader(DataConfig(train=str(inside), batch_size=1, workers=0), epoch_samples=1)
        report = verify_shards(inside)
        assert not report["ok"] and report["problems"][0]["shard"] == name
        assert "escape" in report["problems"][0]["problem"] or "relative" in report["problems"][0]["problem"]


@pytest.mark.parametrize("line", ["../../etc/passwd", "/JPEGImages/../../../etc/passwd.jpg /S/x.png",
                                  "..", "a/../../b", "/etc/passwd", "C:\\x\\y"])
def test_ids_from_lists_and_label_files_cannot_leave_the_root(tmp_path, line):
    lst = tmp_path / "list.txt"
    lst.write_text(f"2007_000032\n{line}\n")
    with pytest.raises(DataError, match=r"list\.txt:2"):
        read_id_list(lst)
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(DataError):
        FolderDataset(tmp_path, lst)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"2007_000032": [1], line: [2]}))
    with pytest.raises(DataError, match="labels.json"):
        load_cls_labels(labels)
    # The ids are refused before any file is opened: nothing outside was read or created.
    assert sorted(os.listdir(tmp_path)) == ["JPEGImages", "labels.json", "list.txt"]
