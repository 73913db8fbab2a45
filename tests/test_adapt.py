"""train -> evaluate -> adapt -> predict on a tiny npz source, through the command line."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def tiny_npz(path: Path, n_classes: int = 5, per_class: int = 6, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 60, (n_classes * per_class, size, size)).astype(np.uint8)
    for c in range(n_classes):
        images[c * per_class:(c + 1) * per_class, c * 3:c * 3 + 4, c * 3:c * 3 + 4] = 250
    np.savez(path, images=images, labels=np.repeat(np.arange(n_classes), per_class),
             class_names=np.asarray([f"c{c}" for c in range(n_classes)]))
    return images


@pytest.mark.parametrize("method", ["protonet", "maml"])
def test_train_evaluate_adapt_predict(tmp_path: Path, method: str, capsys: pytest.CaptureFixture[str]) -> None:
    images = tiny_npz(tmp_path / "tiny.npz")
    run = tmp_path / "run"
    sets = ["data.root=" + str(tmp_path / "tiny.npz"), "split.novel=[c3, c4]", "split.validation=[]",
            "model.filters=4", "model.norm_groups=2", "ways=2", "shots=1", "queries=2",
            "episodes.eval_episodes=3", "train.iterations=1", "train.device=cpu", "method.inner_steps=1",
            "method.meta_batch=2"]
    args = ["train", str(REPO / "configs" / f"classify_{method}.yaml"), "--out", str(run)]
    assert main([*args, *[a for s in sets for a in ("--set", s)]]) == 0
    assert main(["evaluate", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["method"] == method and report["episodes"] == 3 and report["chance"] == 0.5
    for block in (report["metrics"], report["untrained"]["metrics"]):
        for name in ("accuracy", "balanced_accuracy", "auc"):
            lo, hi = block[name]["ci95"]
            assert lo <= block[name]["mean"] <= hi
    assert set(report["per_class"]) == {"c3", "c4"}
    assert np.asarray(report["confusion"]["matrix"]).sum() == 3 * 2 * 2
    assert (run / "confusion.png").is_file() and (run / "confusion.json").is_file()

    # a new "lesion type" pair from class folders of PNGs (a novel class and a base class, renamed)
    support = tmp_path / "support"
    for name, idx in (("new_a", 18), ("new_b", 0)):
        (support / name).mkdir(parents=True)
        Image.fromarray(images[idx]).save(support / name / "1.png")
    query = tmp_path / "q.png"
    Image.fromarray(images[19]).save(query)
    adapted = tmp_path / "adapted"
    assert main(["adapt", str(run), "--support", str(support), "--out", str(adapted)]) == 0
    assert main(["predict", str(adapted), str(query), "--out", str(tmp_path / "pred")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-2]  # the last line names the predictions file
    probs = [float(part.split("=")[1]) for part in line.split()[2:]]
    assert line.startswith(str(query)) and "new_a=" in line and "new_b=" in line
    assert sum(probs) == pytest.approx(1.0, abs=1e-3)


def test_adapt_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapt", str(tmp_path), "--support", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert main(["predict", str(tmp_path), str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("error" in e for e in err)


def test_adapt_from_csv_of_nifti_and_dicom_and_predict_either(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """3D route: a support CSV mixing a NIfTI file and a DICOM series folder; predicting on the DICOM copy of the
    NIfTI support scan (and vice versa) must pick that scan's class, so both readers give the same world image."""
    from dicom_factory import write_series

    from datasets.dicom import load_series

    rng = np.random.default_rng(0)
    scans = {}
    for c in range(3):  # class c: a bright cube at its own position, noise elsewhere
        for k in range(3):
            stored = rng.integers(900, 1100, (12, 12, 10)).astype(np.uint16)  # HU = stored - 1024
            stored[2 + 3 * c:6 + 3 * c, 3:8, 2:7] = 1400
            series = tmp_path / "dicom" / f"c{c}_{k}"
            write_series(series, stored, pixel_spacing=(2.0, 2.0), step=(0.0, 0.0, 2.0))
            nifti = tmp_path / "train" / f"c{c}" / f"case{k}.nii.gz"
            nifti.parent.mkdir(parents=True, exist_ok=True)
            nib_image = load_series(series).to_nifti()
            nib_image.to_filename(str(nifti))
            scans[(c, k)] = (series, nifti)
    run = tmp_path / "run"
    sets = ["data.source=folder", f"data.root={tmp_path / 'train'}", "data.labels=null", "split.novel=[c2]",
            "transforms.roi_size=[16, 16, 16]", "model.channels=[4, 8]", "model.pool_size=2", "ways=2", "shots=1",
            "queries=1", "episodes.eval_episodes=2", "train.iterations=1", "train.device=cpu"]
    assert main(["train", str(REPO / "configs" / "base.yaml"), "--out", str(run),
                 *[a for s in sets for a in ("--set", s)]]) == 0
    support = tmp_path / "support.csv"
    support.write_text(f"path,label\n{scans[(0, 0)][1]},scan_a\n{scans[(2, 0)][0]},scan_b\n")
    adapted = tmp_path / "adapted"
    assert main(["adapt", str(run), "--support", str(support), "--out", str(adapted)]) == 0
    capsys.readouterr()
    # the DICOM twin of support scan_a, the NIfTI twin of support scan_b
    assert main(["predict", str(adapted), str(scans[(0, 0)][0]), str(scans[(2, 0)][1]),
                 "--out", str(tmp_path / "p")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[-3:-1]
    for line, expected in zip(lines, ("scan_a", "scan_b"), strict=True):
        probs = {p.split("=")[0]: float(p.split("=")[1]) for p in line.split() if "=" in p}
        assert set(probs) == {"scan_a", "scan_b"} and probs[expected] > 0.9, line  # measured 0.994


@pytest.fixture(scope="module")
def lesion_adapted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    """A lesion-crop run (TCIA-style cohort, findings with LPS centres) adapted to two lesion types; returns the
    adapted folder and the findings rows (series folder as `path`)."""
    import csv

    base = tmp_path_factory.mktemp("lesions")
    cohort = base / "cohort"
    assert main(["synth", str(cohort), "--patients", "8", "--seed", "1"]) == 0
    run = base / "run"
    assert main(["train", str(REPO / "configs" / "smoke.yaml"), "--set", f"data.root={cohort}", "--set",
                 "train.iterations=1", "--out", str(run)]) == 0
    series = {p.name.split("-")[-1]: p for p in cohort.glob("SYN*/*/*") if p.is_dir() and p.name != "labels"}
    rows = []
    with (cohort / "findings.csv").open() as f:
        for r in csv.DictReader(f):
            rows.append({"path": str(series[r["series_uid"][-5:]]), "label": r["lesion_type"],
                         **{k: r[k] for k in ("lps_x", "lps_y", "lps_z")}})
    kinds = sorted({r["label"] for r in rows})[:2]
    support = [r for k in kinds for r in [r for r in rows if r["label"] == k][:2]]
    lines = ["path,label,lps_x,lps_y,lps_z"] + [",".join(r[k] for k in ("path", "label", "lps_x", "lps_y", "lps_z"))
                                                for r in support]
    (base / "support.csv").write_text("\n".join(lines) + "\n")
    assert main(["adapt", str(run), "--support", str(base / "support.csv"), "--out", str(base / "adapted")]) == 0
    return base / "adapted", rows


def test_predict_writes_csv_and_json_for_a_query_csv(lesion_adapted: tuple[Path, list[dict[str, str]]],
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapted, rows = lesion_adapted
    queries = tmp_path / "queries.csv"
    queries.write_text("path,lps_x,lps_y,lps_z\n" + "".join(f"{r['path']},{r['lps_x']},{r['lps_y']},{r['lps_z']}\n"
                                                            for r in rows[:3]))
    out = tmp_path / "pred"
    assert main(["predict", str(adapted), "--queries", str(queries), "--out", str(out)]) == 0
    records = json.loads((out / "predictions.json").read_text())
    assert [r["input"] for r in records] == [r["path"] for r in rows[:3]]
    assert records[0]["centre"] == [float(rows[0][k]) for k in ("lps_x", "lps_y", "lps_z")]
    table = (out / "predictions.csv").read_text().splitlines()
    assert len(table) == 4 and table[0].startswith("input,centre,prediction,p_")
    for rec in records:
        assert sum(rec["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert rec["prediction"] == max(rec["probabilities"], key=rec["probabilities"].get)
    # different centres in one scan give different crops, so different probabilities
    assert len({json.dumps(r["probabilities"]) for r in records}) > 1


def test_predict_refuses_a_lesion_run_without_a_centre_or_outside_the_volume(
        lesion_adapted: tuple[Path, list[dict[str, str]]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    adapted, rows = lesion_adapted
    scan = rows[0]["path"]
    out = tmp_path / "pred"
    assert main(["predict", str(adapted), scan, "--out", str(out)]) == 2
    assert "give the lesion centre" in capsys.readouterr().err and not out.exists()
    centre = [float(rows[0][k]) for k in ("lps_x", "lps_y", "lps_z")]
    for axis in range(3):
        for offset in (-1000.0, 1000.0):  # far beyond the lower and the upper edge of every axis
            far = list(centre)
            far[axis] += offset
            assert main(["predict", str(adapted), scan, "--centre", *map(str, far), "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert "lies outside the volume" in err and "Traceback" not in err and not out.exists()
    assert main(["predict", str(adapted), scan, "--whole-volume", "--out", str(out)]) == 0
    assert json.loads((out / "predictions.json").read_text())[0]["centre"] is None


def test_adapt_takes_the_collections_own_findings_csv(lesion_adapted: tuple[Path, list[dict[str, str]]],
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rows of the cohort's findings.csv (series_uid, the config's label_column lesion_type, LPS centres): the
    series are found through the run's manifest.csv."""
    adapted, _ = lesion_adapted
    run = adapted.parent / "run"
    findings = (adapted.parent / "cohort" / "findings.csv").read_text().splitlines()
    kinds = sorted({line.split(",")[4] for line in findings[1:]})[:2]
    rows = [line for k in kinds for line in [ln for ln in findings[1:] if ln.split(",")[4] == k][:2]]
    (tmp_path / "findings.csv").write_text("\n".join([findings[0], *rows]) + "\n")
    assert main(["adapt", str(run), "--support", str(tmp_path / "findings.csv"), "--out", str(tmp_path / "a")]) == 0
    summary = json.loads((tmp_path / "a" / "adapted.json").read_text())
    assert summary["classes"] == kinds and sum(summary["support_per_class"].values()) == 4
    unknown = rows[0].split(",")
    unknown[2] = "1.2.3.4"  # a series the run never indexed
    (tmp_path / "new.csv").write_text("\n".join([findings[0], ",".join(unknown), *rows[1:]]) + "\n")
    assert main(["adapt", str(run), "--support", str(tmp_path / "new.csv"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "manifest" in err and not (tmp_path / "b").exists()
