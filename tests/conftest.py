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
