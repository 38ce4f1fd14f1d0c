"""The README documents what the code does: the config reference is the generated one, and the
commands it names exist."""
from pathlib import Path

from hsc_fast.config import markdown_reference
from hsc_fast.engine.pipeline import STAGES

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_config_reference_is_current():
    assert markdown_reference() in README, "README config reference is stale: run python -m hsc_fast.config"


def test_two_commands_and_stage_names_are_documented():
    assert "make demo" in README and "make test" in README
    for stage in STAGES[1:]:
        assert stage in README, stage
    for script in ("launch/train_cam.py", "launch/make_seeds.py", "launch/train_deeplab.py", "launch/pipeline.py"):
        assert script in README and (Path(__file__).resolve().parent.parent / script).is_file()
