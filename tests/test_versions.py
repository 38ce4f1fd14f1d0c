"""setup.py's declared lower bounds are the versions constraints.txt pins (the ones CI and
`make setup` install and the suite runs with), so the promise and the tested set cannot drift."""
import ast
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def declared_requirements() -> dict:
    """name -> Requirement of install_requires and every extra, read from setup.py's source."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    texts = list(keywords["install_requires"]) + [r for extra in keywords["extras_require"].values() for r in extra]
    reqs = [Requirement(t) for t in texts]
    return {canonicalize_name(r.name): r for r in reqs}


def pinned_versions() -> dict:
    """name -> version of every `name==version` line of constraints.txt."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not a name==version pin"
            pins[canonicalize_name(Requirement(name).name)] = version.strip()
    return pins


def test_every_pinned_package_is_declared_with_the_pin_as_lower_bound():
    declared, pins = declared_requirements(), pinned_versions()
    assert pins, "constraints.txt pins nothing"
    for name, version in pins.items():
        assert name in declared, f"{name}=={version} is pinned but setup.py does not declare it"
        lower = [s.version for s in declared[name].specifier if s.operator == ">="]
        assert lower == [version], f"setup.py {declared[name]}: lower bound must be the pinned {version}"


def test_declared_ranges_have_lower_bounds_and_no_upper_bounds():
    """Every requirement names the oldest version we test (>=) and none caps versions (no known break)."""
    for name, req in declared_requirements().items():
        operators = sorted(s.operator for s in req.specifier)
        assert operators == [">="], f"{req}: expected exactly one '>=' bound"
