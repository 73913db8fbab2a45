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
    assert main(["predict", str(adapted), str(query)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    probs = [float(part.split("=")[1]) for part in line.split()[2:]]
    assert line.startswith(str(query)) and "new_a=" in line and "new_b=" in line
    assert sum(probs) == pytest.approx(1.0, abs=1e-3)


def test_adapt_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adapt", str(tmp_path), "--support", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert main(["predict", str(tmp_path), str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("error" in e for e in err)
