"""Progress bars that suit both a terminal and a log file."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """`tqdm` that redraws at most every `LOG_INTERVAL_S` seconds when stderr is not a terminal.

    In a terminal a bar redraws in place; in a log file (CI, `nohup`, batch jobs) every redraw is a new chunk of
    text, and tqdm's default of ten a second turned a 2-minute evaluation into megabytes of log.
    """
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
