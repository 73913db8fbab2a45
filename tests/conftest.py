"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real-data folder (env FEWSCAN_DATA, else ../shared/data); skips when absent."""
    root = Path(os.environ.get("FEWSCAN_DATA", REPO.parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set FEWSCAN_DATA)")
    return root


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch intra-op thread per test (restored after): the models here are tiny, and on a shared 2-core
    machine a second thread mostly waits (measured 10-25x slower steps under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes): to check that a refused command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def refuses_episode_files(capsys: pytest.CaptureFixture[str]):  # noqa: ANN201 - returns the check
    """`check(run, [(file, needle), ...])`: `evaluate RUN --episodes FILE` exits 2 with one line naming FILE and
    containing `needle`, and leaves every file of RUN as it was (a refused file is neither copied nor scored)."""
    from pipeline.__main__ import main

    def check(run: Path, bad_files: list[tuple[Path, str]]) -> None:
        before = folder_bytes(run)
        capsys.readouterr()
        for bad, needle in bad_files:
            assert main(["evaluate", str(run), "--episodes", str(bad)]) == 2
            err = capsys.readouterr().err
            assert str(bad) in err and needle in err and len(err.strip().splitlines()) == 1, err
            assert folder_bytes(run) == before, f"{bad} changed {run}"

    return check
