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


def test_progress_bars_redraw_rarely_in_logs(monkeypatch) -> None:
    """Not a terminal (CI, log files): at most one redraw per 30 s; in a terminal tqdm's own default."""
    import io

    from pipeline.progress import LOG_INTERVAL_S, progress

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress(range(3)).mininterval == LOG_INTERVAL_S
    tty = io.StringIO()
    tty.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr("sys.stderr", tty)
    assert progress(range(3)).mininterval == 0.1
