"""The bare-name packages must resolve to this repository (a pip-installed `datasets` would shadow ours)."""

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["datasets", "transforms", "pipeline"])
def test_packages_import_from_this_repo(name: str) -> None:
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO / name


def test_no_init_in_configs_or_tests() -> None:
    assert not (REPO / "configs" / "__init__.py").exists()
    assert not (REPO / "tests" / "__init__.py").exists()
