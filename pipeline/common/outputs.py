"""Where each command-line verb writes, checked before any work starts (imported by `pipeline/__main__.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets.volume import FewscanError

# Where each verb writes: a folder (created, or a run to resume) or a file; checked before any work starts.
OUT_FOLDERS = {"train": "out", "adapt": "out", "predict": "out", "register": "out", "synth": "out_dir",
               "demo": "out", "export": "out"}
OUT_FILES = {"convert": "out", "index": "out", "patches": "out", "episodes": "out", "evaluate": "out"}


def check_outputs(verb: str, args: Any) -> None:
    """Refuse an output folder that is an existing file, or an output file that is an existing folder."""
    folder = getattr(args, OUT_FOLDERS.get(verb, ""), None)
    if isinstance(folder, Path) and folder.exists() and not folder.is_dir():
        raise FewscanError(f"{folder}: is a file; --out names a folder to write into")
    file = getattr(args, OUT_FILES.get(verb, ""), None)
    if isinstance(file, Path) and file.is_dir():
        raise FewscanError(f"{file}: is a folder; name the file to write")
