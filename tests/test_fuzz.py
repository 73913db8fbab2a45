"""Damaged and hostile files: seeded byte-mutation fuzzing of the readers, and memory bombs refused from the header.

The full budget (10,000 mutations) runs in `benchmarks/fuzz_loaders.py`; CI runs a slice of it.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fuzz_harness import fuzz, read_bomb, write_bombs

from datasets.volume import InputError
from pipeline.__main__ import main


def test_mutated_dicom_nifti_and_mha_files_raise_only_input_errors(tmp_path: Path) -> None:
    result = fuzz(tmp_path, n_per_seed=60, seed=0)
    assert result.counts["other"] == 0, "\n".join(f"{n} x {k}: {result.examples[k]}"
                                                 for k, n in result.findings.most_common())
    # the mutations do reach the readers' error paths (and leave some files readable)
    assert result.counts["input error"] > 50 and result.counts["accepted"] > 10


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_bombs(tmp_path_factory.mktemp("bombs"))


def test_every_memory_bomb_is_refused_from_its_header(bombs: dict[str, Path]) -> None:
    for name, path in bombs.items():
        with pytest.raises(InputError) as err:
            read_bomb(path)
        assert str(path) in str(err.value), name
        assert any(word in str(err.value) for word in ("declares", "objects")), f"{name}: {err.value}"


def test_convert_refuses_a_bomb_in_one_line_and_writes_nothing(bombs: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    for name, path in bombs.items():
        if path.suffix == ".npz":
            continue
        out = tmp_path / "out.nii.gz"
        assert main(["convert", str(path), str(out)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0] and "declares" in err[0], (name, err)
        assert not out.exists() and not list(tmp_path.glob(".out*")), name


def test_the_memory_limit_follows_fewscan_max_gb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datasets.volume_io import load_volume

    path = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 64), np.float32), np.eye(4)), path)
    assert load_volume(path).array.shape == (64, 64, 64)
    monkeypatch.setenv("FEWSCAN_MAX_GB", "0.0005")  # 0.5 MiB: the 1 MiB volume no longer fits
    with pytest.raises(InputError, match="FEWSCAN_MAX_GB"):
        load_volume(path)
    monkeypatch.setenv("FEWSCAN_MAX_GB", "lots")
    with pytest.raises(InputError, match="not a number"):
        load_volume(path)
