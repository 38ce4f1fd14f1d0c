"""README is the first hour: the two commands and the launch scripts it names exist. Everything
else (the config reference, every stage) is in the documentation site, tested in tests/test_docs.py."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_two_commands_and_launch_scripts_are_documented():
    assert "make demo" in README and "make test" in README
    for script in ("launch/train_cam.py", "launch/make_seeds.py", "launch/refine.py", "launch/train_deeplab.py",
                   "launch/pipeline.py"):
        assert script in README and (REPO / script).is_file(), script


def test_readme_is_short_and_its_links_reach_files():
    assert len(README.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        if "://" not in link:
            assert (REPO / link).is_file(), link
