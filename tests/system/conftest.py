"""tests/system/: the multi-process, multi-node and whole-pipeline tests. Every test here is `slow`
(`make test-fast` skips them), whether or not its own marker says so."""
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/system/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.slow)
