"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real-data folder (env FEWSCAN_DATA, else ../shared/data); skips when absent."""
    root = Path(os.environ.get("FEWSCAN_DATA", REPO.parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set FEWSCAN_DATA)")
    return root
