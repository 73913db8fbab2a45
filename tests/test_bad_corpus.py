"""The bad-input corpus (issue #19): every verb, fed damaged files, broken runs, bad CSVs and bad options, must exit 2
with one line naming the file or key and the reason, and leave the folders it was pointed at exactly as they were.

Each case builds its inputs in a fresh folder (copies of shared tiny runs where it corrupts one), snapshots every
file under that folder and under the shared runs, runs the command line in-process and compares.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from dicom_factory import ramp, square, write_rtstruct, write_series
from fuzz_harness import write_bombs

from datasets.synth_decathlon import write_synthetic_subjects
from pipeline.__main__ import main

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Shared:
    """Tiny valid inputs every case may point at (never modified: the snapshot checks that too)."""

    root: Path
    cohort: Path
    run: Path  # classification, trained on `cohort`
    adapted: Path
    reg_run: Path
    image: Path  # a valid NIfTI
    labels: Path  # its label map
    support: Path  # a valid support CSV for `run`


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Shared:
    root = tmp_path_factory.mktemp("shared")
    cohort = root / "cohort"
    assert main(["synth", str(cohort), "--patients", "16", "--seed", "2"]) == 0
    run = root / "run"
    assert main(["train", str(REPO / "configs" / "smoke.yaml"), "--set", f"data.root={cohort}",
                 "train.iterations=1", "episodes.eval_episodes=2", "--out", str(run)]) == 0
    rows = [r for r in csv.DictReader((cohort / "findings.csv").open())]
    support = root / "support.csv"
    with support.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["series_uid", "lesion_type", "lps_x", "lps_y", "lps_z"])
        writer.writeheader()
        for kind in ("spiculated_mass", "cavitary_lesion"):
            for r in [r for r in rows if r["lesion_type"] == kind][:2]:
                writer.writerow({k: r[k] for k in writer.fieldnames})
    adapted = root / "adapted"
    assert main(["adapt", str(run), "--support", str(support), "--out", str(adapted)]) == 0
    task = write_synthetic_subjects(root / "Task", n_cases=6, shape=(16, 16, 16))
    config = root / "reg.yaml"
    config.write_text(json.dumps({
        "task": "registration", "seed": 0, "data": {"source": "decathlon", "root": str(task)},
        "transforms": {"preset": "mr", "spacing": None, "volume_size": [16, 16, 16]}, "train": {"iterations": 1},
        "registration": {"test_patients": 0.4, "adapt_patients": 0, "train_pairs": 2, "pairs_per_task": 2,
                         "eval_pairs": 1, "features": 4, "levels": 2, "inner_steps": 1, "prealign": "none",
                         "instance_steps": 0, "baseline": "none"}}))
    assert main(["train", str(config), "--out", str(root / "reg_run")]) == 0
    image = sorted((task / "imagesTr").glob("*.nii.gz"))[0]
    return Shared(root, cohort, run, adapted, root / "reg_run", image,
                  task / "labelsTr" / image.name, support)


# --- bad image files: each is fed to every verb that reads an image ------------------------------------------
def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def _truncated_gz(d: Path) -> Path:
    good = _nifti(d / "full.nii.gz", np.random.default_rng(0).random((16, 16, 16)).astype(np.float32))
    data = gzip.decompress(good.read_bytes())
    (d / "cut.nii.gz").write_bytes(gzip.compress(data[: len(data) // 2]))
    good.unlink()
    return d / "cut.nii.gz"


def _truncated_dcm(d: Path) -> Path:
    (f,) = write_series(d / "s", ramp(64, 64, 1))
    f.write_bytes(f.read_bytes()[:3000])
    return d / "s"


def _text_folder(d: Path) -> Path:
    (d / "notes").mkdir()
    (d / "notes" / "a.txt").write_text("not an image\n")
    (d / "notes" / "b.dcm").write_text("not DICOM either\n")
    return d / "notes"


def _rtstruct_only(d: Path) -> Path:
    files = write_series(d / "ct", ramp(6, 6, 2), origin=(0.0, 0.0, 0.0), pixel_spacing=(1.0, 1.0))
    write_rtstruct(d / "rt" / "rt.dcm", files, [(1, 0, square(1, 1, 3, 3, 0))])
    shutil.rmtree(d / "ct")
    return d / "rt"


def _bomb(name: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        return write_bombs(d / "bombs")[name]
    return make


BAD_IMAGES: dict[str, Callable[[Path], Path]] = {
    "zero-byte .nii.gz": lambda d: (d / "empty.nii.gz").write_bytes(b"") or d / "empty.nii.gz",
    "text named .nii.gz": lambda d: (d / "t.nii.gz").write_text("hello") or d / "t.nii.gz",
    "random bytes .nii": lambda d: (d / "r.nii").write_bytes(np.random.default_rng(1).bytes(2000)) or d / "r.nii",
    "truncated .nii.gz": _truncated_gz,
    "all-NaN NIfTI": lambda d: _nifti(d / "nan.nii.gz", np.full((8, 8, 8), np.nan, np.float32)),
    "NIfTI with inf voxels": lambda d: _nifti(d / "inf.nii.gz", np.where(np.eye(8)[:, :, None] > 0, np.inf, 1.0)
                                              .repeat(8, 2).astype(np.float32)),
    "degenerate affine": lambda d: _nifti(d / "sing.nii.gz", np.ones((8, 8, 8), np.float32),
                                          np.diag([1e-5, 1e-5, 1e-5, 1.0])),
    "text named .dcm": lambda d: (d / "x.dcm").write_text("not DICOM") or d / "x.dcm",
    "truncated DICOM": _truncated_dcm,
    "empty folder": lambda d: (d / "empty").mkdir() or d / "empty",
    "folder of text files": _text_folder,
    "missing path": lambda d: d / "does_not_exist.nii.gz",
    "RTSTRUCT without its series": _rtstruct_only,
    "garbage .mha": lambda d: (d / "g.mha").write_text("NDims = banana\n") or d / "g.mha",
    "nifti header bomb": _bomb("nifti.gz claiming 1024^3 float32, no data"),
    "DICOM frame-count bomb": _bomb("DICOM, 8 KB file, NumberOfFrames 1000000000"),
    "MetaImage size bomb": _bomb("MetaImage claiming 10^13 floats"),
}


@dataclass
class Case:
    """A command line built in folder `d` from the shared inputs `s`."""

    argv: Callable[[Path, Shared], list[str]]
    says: str = ""  # a word the one error line must hold (besides the file or key it names)


def _image_cases() -> dict[str, Case]:
    cases = {}
    for name, make in BAD_IMAGES.items():
        cases[f"convert {name}"] = Case(lambda d, s, m=make: ["convert", str(m(d)), str(d / "out" / "x.nii.gz")])
        cases[f"register --fixed {name}"] = Case(
            lambda d, s, m=make: ["register", "--fixed", str(m(d)), "--moving", str(s.image), "--checkpoint",
                                  str(s.reg_run), "--out", str(d / "out")])
        cases[f"register --moving {name}"] = Case(
            lambda d, s, m=make: ["register", "--fixed", str(s.image), "--moving", str(m(d)), "--checkpoint",
                                  str(s.reg_run), "--out", str(d / "out")])
        cases[f"predict {name}"] = Case(
            lambda d, s, m=make: ["predict", str(s.adapted), str(m(d)), "--whole-volume", "--out", str(d / "out")])
    return cases


# --- broken runs -------------------------------------------------------------------------------------------
def _copy_run(d: Path, s: Shared, change: Callable[[Path], object]) -> Path:
    run = d / "run"
    shutil.copytree(s.run, run)
    change(run)
    return run


def _write(rel: str, data: bytes | str) -> Callable[[Path], object]:
    def change(run: Path) -> None:
        target = run / rel
        target.write_bytes(data) if isinstance(data, bytes) else target.write_text(data)
    return change


def _torch_save(run: Path) -> None:
    torch.save({"w": torch.zeros(2)}, run / "model.safetensors")


BROKEN_RUNS: dict[str, Callable[[Path], object]] = {
    "config.yaml invalid YAML": _write("config.yaml", "task: [classification\n"),
    "config.yaml a list": _write("config.yaml", "- 1\n- 2\n"),
    "config.yaml unknown key": lambda r: (r / "config.yaml").write_text((r / "config.yaml").read_text()
                                                                        + "bogus_key: 1\n"),
    "split.json missing": lambda r: (r / "split.json").unlink(),
    "split.json a list": _write("split.json", "[1, 2]"),
    "split.json invalid JSON": _write("split.json", "{"),
    "model.safetensors zero bytes": _write("model.safetensors", b""),
    "model.safetensors pickle": _write("model.safetensors", pickle.dumps({"w": [1, 2]})),
    "model.safetensors torch.save": _torch_save,
    "model.safetensors missing": lambda r: (r / "model.safetensors").unlink(),
    "untrained.safetensors zero bytes": _write("untrained.safetensors", b""),
    "config.yaml wrong value type": lambda r: (r / "config.yaml").write_text(
        (r / "config.yaml").read_text().replace("iterations: 1\n", "iterations: many\n")),
}


def _run_cases() -> dict[str, Case]:
    cases = {}
    for name, change in BROKEN_RUNS.items():
        cases[f"evaluate, {name}"] = Case(lambda d, s, c=change: ["evaluate", str(_copy_run(d, s, c))])
        if "untrained" not in name:
            cases[f"adapt, {name}"] = Case(lambda d, s, c=change: ["adapt", str(_copy_run(d, s, c)), "--support",
                                                                   str(s.support), "--out", str(d / "out")])
    return cases


# --- bad CSVs, configs and options ---------------------------------------------------------------------------
def _csv(d: Path, rows: list[dict[str, str]] | str, name: str = "s.csv") -> Path:
    path = d / name
    if isinstance(rows, str):
        path.write_text(rows)
        return path
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _support_rows(s: Shared, **change: str) -> list[dict[str, str]]:
    rows = list(csv.DictReader(s.support.open()))
    return [{**r, **change} for r in rows]


def _config(d: Path, text: str) -> Path:
    (d / "c.yaml").write_text(text)
    return d / "c.yaml"


OTHER: dict[str, Case] = {
    # adapt: the support set
    "adapt, support missing": Case(lambda d, s: ["adapt", str(s.run), "--support", str(d / "no.csv"), "--out",
                                                 str(d / "out")]),
    "adapt, support empty file": Case(lambda d, s: ["adapt", str(s.run), "--support", str(_csv(d, "")), "--out",
                                                    str(d / "out")]),
    "adapt, support without label column": Case(lambda d, s: ["adapt", str(s.run), "--support", str(_csv(
        d, [{k: v for k, v in r.items() if k != "lesion_type"} for r in _support_rows(s)])), "--out", str(d / "o")]),
    "adapt, support series not indexed": Case(lambda d, s: ["adapt", str(s.run), "--support", str(_csv(
        d, _support_rows(s, series_uid="1.2.3.4"))), "--out", str(d / "out")]),
    "adapt, support path missing": Case(lambda d, s: ["adapt", str(s.run), "--support", str(_csv(
        d, [{"path": "nowhere", "label": "a", "lps_x": "0", "lps_y": "0", "lps_z": "0"}])), "--out", str(d / "o")]),
    "adapt, support centre not numeric": Case(lambda d, s: ["adapt", str(s.run), "--support", str(_csv(
        d, _support_rows(s, lps_x="left"))), "--out", str(d / "out")]),
    "adapt, support centre 100 m outside": Case(lambda d, s: ["adapt", str(s.run), "--support", str(_csv(
        d, _support_rows(s, lps_x="100000"))), "--out", str(d / "out")], "outside"),
    "adapt, support one class": Case(lambda d, s: ["adapt", str(s.run), "--support", str(_csv(
        d, _support_rows(s, lesion_type="only"))), "--out", str(d / "out")]),
    "adapt, run missing": Case(lambda d, s: ["adapt", str(d / "norun"), "--support", str(s.support), "--out",
                                             str(d / "out")]),
    "adapt, out is a file": Case(lambda d, s: ["adapt", str(s.run), "--support", str(s.support), "--out",
                                               str(_csv(d, "x\n", "taken"))]),
    # predict
    "predict, adapted missing": Case(lambda d, s: ["predict", str(d / "none"), str(s.image), "--whole-volume"]),
    "predict, not an adapted folder": Case(lambda d, s: ["predict", str(s.run), str(s.image), "--whole-volume"]),
    "predict, no inputs": Case(lambda d, s: ["predict", str(s.adapted), "--out", str(d / "out")]),
    "predict, queries missing": Case(lambda d, s: ["predict", str(s.adapted), "--queries", str(d / "q.csv"),
                                                   "--out", str(d / "out")]),
    "predict, queries without path": Case(lambda d, s: ["predict", str(s.adapted), "--queries",
                                                        str(_csv(d, "a,b\n1,2\n")), "--out", str(d / "out")]),
    "predict, 3D input without a centre": Case(lambda d, s: ["predict", str(s.adapted), str(s.image), "--out",
                                                             str(d / "out")]),
    "predict, centre outside": Case(lambda d, s: ["predict", str(s.adapted), str(s.image), "--centre", "9e5", "0",
                                                  "0", "--out", str(d / "out")], "outside"),
    "predict, state corrupt": Case(lambda d, s: ["predict", str(_copy_adapted(d, s)), str(s.image),
                                                 "--whole-volume", "--out", str(d / "out")]),
    # train
    "train, config missing": Case(lambda d, s: ["train", str(d / "none.yaml"), "--out", str(d / "run")]),
    "train, config invalid YAML": Case(lambda d, s: ["train", str(_config(d, "a: [\n")), "--out", str(d / "run")]),
    "train, config unknown key": Case(lambda d, s: ["train", str(_config(d, f"extends: {REPO}/configs/base.yaml\n"
                                                                           "bogus: 1\n")),
                                                    "--out", str(d / "run")], "bogus"),
    "train, config wrong type": Case(lambda d, s: ["train", str(_config(d, "task: classification\ntrain: "
                                                                           "{iterations: many}\n")),
                                                   "--out", str(d / "run")], "iterations"),
    "train, data root missing": Case(lambda d, s: ["train", str(REPO / "configs" / "smoke.yaml"), "--set",
                                                   f"data.root={d / 'nothing'}", "--out", str(d / "run")]),
    "train, novel class not in the data": Case(lambda d, s: ["train", str(REPO / "configs" / "smoke.yaml"), "--set",
                                                             f"data.root={s.cohort}", "split.novel=[unicorn]",
                                                             "--out", str(d / "run")], "unicorn"),
    "train, --set unknown key": Case(lambda d, s: ["train", str(REPO / "configs" / "smoke.yaml"), "--set",
                                                   "model.nope=1", "--out", str(d / "run")], "nope"),
    "train, out is a file": Case(lambda d, s: ["train", str(REPO / "configs" / "smoke.yaml"), "--set",
                                               f"data.root={s.cohort}", "--out", str(_csv(d, "x", "taken"))]),
    "train, --resume without a checkpoint": Case(lambda d, s: ["train", str(REPO / "configs" / "smoke.yaml"),
                                                               "--set", f"data.root={s.cohort}", "--out",
                                                               str(d / "run"), "--resume"]),
    # evaluate options
    "evaluate, not a run": Case(lambda d, s: ["evaluate", str(d)]),
    "evaluate, --episodes missing": Case(lambda d, s: ["evaluate", str(_copy_run(d, s, lambda r: None)),
                                                       "--episodes", str(d / "e.json")]),
    "evaluate, --episodes invalid JSON": Case(lambda d, s: ["evaluate", str(_copy_run(d, s, lambda r: None)),
                                                            "--episodes", str(_csv(d, "{", "e.json"))]),
    "evaluate, --episodes wrong cases": Case(lambda d, s: ["evaluate", str(_copy_run(d, s, lambda r: None)),
                                                           "--episodes", str(_csv(d, '[{"cases": [1]}]', "e.json"))]),
    "evaluate, --set a training key": Case(lambda d, s: ["evaluate", str(_copy_run(d, s, lambda r: None)), "--set",
                                                         "model.encoder=resnet10"], "model.encoder"),
    "evaluate, --set shots not a number": Case(lambda d, s: ["evaluate", str(_copy_run(d, s, lambda r: None)),
                                                             "--set", "shots=many"], "shots"),
    # register
    "register, checkpoint not a run": Case(lambda d, s: ["register", "--fixed", str(s.image), "--moving",
                                                         str(s.image), "--checkpoint", str(d), "--out",
                                                         str(d / "out")]),
    "register, labels all background": Case(lambda d, s: ["register", "--fixed", str(s.image), "--moving",
                                                           str(s.image), "--moving-labels", str(_nifti(
                                                               d / "l.nii.gz", np.zeros((16, 16, 16), np.uint8),
                                                               nib.load(s.image).affine)),
                                                           "--checkpoint", str(s.reg_run), "--out", str(d / "o")]),
    "register, labels off the image": Case(lambda d, s: ["register", "--fixed", str(s.image), "--moving",
                                                         str(s.image), "--moving-labels", str(_nifti(
                                                             d / "l.nii.gz", np.ones((9, 9, 9), np.uint8),
                                                             np.diag([1, 1, 1, 1.0]) + np.eye(4, k=3) * 500)),
                                                         "--checkpoint", str(s.reg_run), "--out", str(d / "o")],
                                          "overlap"),
    "register, out is a file": Case(lambda d, s: ["register", "--fixed", str(s.image), "--moving", str(s.image),
                                                  "--checkpoint", str(s.reg_run), "--out",
                                                  str(_csv(d, "x", "taken"))]),
    # report, export
    "report, not a run": Case(lambda d, s: ["report", str(d)]),
    "report, no report yet": Case(lambda d, s: ["report", str(_copy_run(d, s, lambda r: None))], "evaluate"),
    "report, report JSON invalid": Case(lambda d, s: ["report", str(_copy_run(d, s, lambda r: None)), "--report",
                                                      str(_csv(d, "{", "r.json"))]),
    "export, not an adapted folder": Case(lambda d, s: ["export", str(s.run), "--format", "bundle", "--out",
                                                        str(d / "b")]),
    "export, out not empty": Case(lambda d, s: ["export", str(s.adapted), "--format", "bundle", "--out",
                                                str(_csv(d, "x", "keep.txt").parent)]),
    "export, state corrupt": Case(lambda d, s: ["export", str(_copy_adapted(d, s)), "--format", "bundle", "--out",
                                                str(d / "b")]),
    # index, decathlon, synth, episodes, patches
    "index, root missing": Case(lambda d, s: ["index", str(d / "none"), "--out", str(d / "m.csv")]),
    "index, root empty": Case(lambda d, s: ["index", str((d / "e").mkdir() or d / "e"), "--out", str(d / "m.csv")]),
    "index, out is a folder": Case(lambda d, s: ["index", str(s.cohort), "--out", str(d)]),
    "index, labels CSV missing": Case(lambda d, s: ["index", str(s.cohort), "--labels", str(d / "f.csv"), "--out",
                                                    str(d / "m.csv")]),
    "index, labels CSV binary": Case(lambda d, s: ["index", str(s.cohort), "--labels", str(_bin(d)), "--out",
                                                   str(d / "m.csv")]),
    "decathlon, root without labels": Case(lambda d, s: ["decathlon", str(_text_folder(d)), "--out",
                                                         str(d / "dec")]),
    "decathlon, out exists": Case(lambda d, s: ["decathlon", str(s.cohort), "--out", str(d)]),
    "synth, zero patients": Case(lambda d, s: ["synth", str(d / "c"), "--patients", "0"]),
    "synth, out is a file": Case(lambda d, s: ["synth", str(_csv(d, "x", "taken"))]),
    "episodes, --n 0": Case(lambda d, s: ["episodes", str(REPO / "configs" / "smoke.yaml"), "--set",
                                          f"data.root={s.cohort}", "--n", "0", "--out", str(d / "e.json")]),
    "episodes, unknown split": Case(lambda d, s: ["episodes", str(REPO / "configs" / "smoke.yaml"), "--set",
                                                  f"data.root={s.cohort}", "--split", "bogus", "--out",
                                                  str(d / "e.json")], "bogus"),
    "patches, names JSON missing": Case(lambda d, s: ["patches", "--image", str(s.image), "--labels", str(s.labels),
                                                      "--names", str(d / "n.json"), "--out", str(d / "p.npz")]),
    "patches, names JSON invalid": Case(lambda d, s: ["patches", "--image", str(s.image), "--labels", str(s.labels),
                                                      "--names", str(_csv(d, "{", "n.json")), "--out",
                                                      str(d / "p.npz")]),
    "patches, two images one label map": Case(lambda d, s: ["patches", "--image", str(s.image), "--image",
                                                            str(s.image), "--labels", str(s.labels), "--names",
                                                            str(_csv(d, '{"1": "core"}', "n.json")), "--out",
                                                            str(d / "p.npz")]),
}


def _copy_adapted(d: Path, s: Shared) -> Path:
    shutil.copytree(s.adapted, d / "adapted")
    (d / "adapted" / "state.safetensors").write_bytes(b"\0" * 10)
    return d / "adapted"


def _bin(d: Path) -> Path:
    (d / "f.csv").write_bytes(bytes(range(256)) * 4)
    return d / "f.csv"


CASES: dict[str, Case] = {**_image_cases(), **_run_cases(), **OTHER}


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under `roots`: path -> sha1 of its bytes (folders: "dir")."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def test_the_corpus_has_at_least_120_cases() -> None:
    assert len(CASES) >= 120, len(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line_and_changes_nothing(name: str, shared: Shared, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES[name]
    argv = case.argv(tmp_path, shared)
    before = snapshot(tmp_path, shared.root)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse: usage line + error line
        rc = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, f"{name}: exit {rc}\n" + "\n".join(err[-20:])
    assert err and "Traceback" not in "\n".join(err), f"{name}:\n" + "\n".join(err[-20:])
    last = err[-1]
    assert len([line for line in err if "error" in line]) == 1 and "error:" in last, f"{name}: {err}"
    if case.says:
        assert case.says in last, f"{name}: {last}"
    assert snapshot(tmp_path, shared.root) == before, f"{name}: files changed: {last}"
