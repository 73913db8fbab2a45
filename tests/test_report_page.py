"""The report page: `evaluate` writes a self-contained `report.html` beside each report JSON for every task kind, and
`python -m pipeline report` rebuilds it; checked structurally with the standard library's HTML parser."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from pipeline.__main__ import main

REPO = Path(__file__).resolve().parents[1]
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
PNG = b"\x89PNG\r\n\x1a\n"


# --- tiny real runs, trained and evaluated through the CLI -------------------------------------------------------
def _cli(argv: list[str]) -> str:
    """Run the CLI; returns what it printed (exit code 0 asserted)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0, argv
    return out.getvalue()


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Classification with a patient split (so split.json holds patient keys); returns the run and `evaluate`'s
    output."""
    base = tmp_path_factory.mktemp("cls")
    _cli(["synth", str(base / "cohort"), "--patients", "16", "--seed", "1"])
    _cli(["train", str(REPO / "configs" / "smoke.yaml"), "--set", f"data.root={base / 'cohort'}",
          "train.iterations=2", "train.log_every=1", "train.ways=2", "episodes.eval_episodes=3", "method.head_steps=5",
          "split.patients.test=0.5", "split.novel=[cyst,hemangioma,solid_nodule]", "shots=1", "episodes.queries=1",
          "--out", str(base / "run")])
    return base / "run", _cli(["evaluate", str(base / "run")])


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """2D prototype segmentation with the finetune and atlas baselines."""
    from datasets.synth_decathlon import write_synthetic_organs

    base = tmp_path_factory.mktemp("seg")
    root = write_synthetic_organs(base / "Task99", n_cases=6, shape=(20, 24, 16), unlabelled=1)
    _cli(["train", str(REPO / "configs" / "segment_decathlon_ssl.yaml"), "--set", f"data.root={root}",
          "train.iterations=2", "train.log_every=1", "episodes.eval_episodes=1", "segmentation.finetune_steps=2",
          "segmentation.channels=[8, 16]", "segmentation.features=8", "segmentation.crop=[16, 16, 16]",
          "segmentation.test_patients=0.5", "segmentation.n_supervoxels=20", "segmentation.overlays=2",
          "train.threads=1", "segmentation.baselines=[finetune, atlas]", "--out", str(base / "run")])
    return base / "run", _cli(["evaluate", str(base / "run")])


@pytest.fixture(scope="module")
def reg_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Reptile registration, adapted, with the SimpleITK affine baseline."""
    from datasets.synth_decathlon import write_synthetic_subjects

    base = tmp_path_factory.mktemp("reg")
    root = write_synthetic_subjects(base / "Task", n_cases=10, shape=(18, 16, 15))
    config = {"task": "registration", "seed": 0, "data": {"source": "decathlon", "root": str(root)},
              "transforms": {"preset": "mr", "spacing": None, "volume_size": [16, 16, 16]},
              "train": {"iterations": 2, "lr": 1e-3, "log_every": 1, "threads": 1},
              "registration": {"test_patients": 0.5, "adapt_patients": 2, "train_pairs": 4, "pairs_per_task": 2,
                               "eval_pairs": 3, "adapt_pairs": 2, "features": 4, "levels": 2, "inner_steps": 1,
                               "adapt_steps": 1, "baseline": "none", "baseline_affine": True}}
    (base / "reg.yaml").write_text(yaml.safe_dump(config))
    _cli(["train", str(base / "reg.yaml"), "--out", str(base / "run")])
    return base / "run", _cli(["evaluate", str(base / "run")])


# --- reading a page ----------------------------------------------------------------------------------------------
class Page(HTMLParser):
    """A parsed page: tags, ids, `<img>` attributes, every src/href, all text, and the cells of each table row
    that has `data-row`, keyed by (id of the enclosing div, data-row)."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.ids: set[str] = set()
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.rows: dict[tuple[str | None, str], list[str]] = {}
        self.text: list[str] = []
        self._divs: list[str | None] = []
        self._row: tuple[str | None, str] | None = None
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        self.ids.update([a["id"]] if "id" in a else [])
        self.links += [a[k] for k in ("src", "href") if k in a]
        if tag == "img":
            self.images.append(a)
        elif tag == "div":
            self._divs.append(a.get("id"))
        elif tag == "tr" and "data-row" in a:
            self._row = (next((d for d in reversed(self._divs) if d), None), a["data-row"])
            self.rows[self._row] = []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            self._divs.pop()
        elif tag == "td" and self._cell is not None and self._row is not None:
            self.rows[self._row].append("".join(self._cell))
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def table(self, div: str) -> dict[str, list[str]]:
        return {key: cells for (d, key), cells in self.rows.items() if d == div}


def fmt(m: dict[str, Any], signed: bool = False) -> str:
    """`mean [low, high]` to 3 decimals, written here independently of the page's own formatting."""
    s = "+" if signed else ""
    return f"{m['mean']:{s}.3f} [{m['ci95'][0]:{s}.3f}, {m['ci95'][1]:{s}.3f}]"


def patient_identifiers(run: Path) -> set[str]:
    """Every patient key and case id the run holds: split.json's patient lists, the episode/pair files' cases and
    (classification) the manifest's patient keys and raw patient folder names."""
    found: set[str] = set()
    split = json.loads((run / "split.json").read_text())
    if "base" in split:  # classification: {base, validation, novel: class names, patients: {part: [keys]}}
        found.update(k for keys in split.get("patients", {}).values() for k in keys)
    elif "train_cases" not in split:  # registration: {data task: {group: [keys]}}; segmentation's holds none
        found.update(k for groups in split.values() for keys in groups.values() for k in keys)
    for name in ("episodes.json", "pairs.json"):
        if (run / name).is_file():
            records = json.loads((run / name).read_text())
            records = [r for part in records.values() for r in part] if isinstance(records, dict) else records
            found.update(c[k] for r in records for c in r["cases"] for k in ("patient_key", "case_id") if k in c)
    if (run / "manifest.csv").is_file():  # the patient key and the raw patient folder (e.g. SYN0015) of each row
        from datasets.index import locate, read_manifest

        root = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])
        for row in locate(read_manifest(run / "manifest.csv"), run / "manifest.csv", root):
            found.update([row["patient_key"], Path(row["path"]).relative_to(root).parts[0]])
    found.discard("")
    return found


EXPECTED = {  # task kind: (fixture, main metric, headline rows, figures beyond the learning curve)
    "classification": ("cls_run", "accuracy", {"untrained", "trained", "baseline_finetune"}, 2),
    "segmentation": ("seg_run", "dice", {"untrained", "trained", "baseline_finetune", "baseline_atlas"}, 1),
    "registration": ("reg_run", "dice", {"unregistered", "meta_init", "trained", "baseline_affine"}, 0),
}


# --- the tests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", list(EXPECTED))
def test_evaluate_writes_a_self_contained_page(task: str, request: pytest.FixtureRequest) -> None:
    from pipeline.common.metrics import paired_differences

    fixture, metric, rows, n_figures = EXPECTED[task]
    run, printed = request.getfixturevalue(fixture)
    page_file = run / "report.html"
    assert f"page: {page_file}" in printed and page_file.is_file()
    assert not list(run.glob(".report.html*"))  # no temporary file left by the atomic write
    source = page_file.read_text(encoding="utf-8")
    page = Page(source)
    report = json.loads((run / "report.json").read_text())

    # self-contained: every image is an embedded PNG, nothing is fetched, nothing runs
    assert not {"script", "link", "iframe", "object"} & set(page.tags)
    assert all(link.startswith("data:image/png;base64,") for link in page.links)
    overlays = len(list(run.glob("overlay_*.png")))
    assert len(page.images) == 1 + n_figures + overlays and (task != "segmentation" or overlays >= 1)
    for img in page.images:
        data = base64.b64decode(img["src"].removeprefix("data:image/png;base64,"), validate=True)
        assert data.startswith(PNG)
        Image.open(io.BytesIO(data)).verify()
    learning_curve = base64.b64encode((run / "learning_curve.png").read_bytes()).decode()
    assert page.images[0]["src"].endswith(learning_curve)

    # headline: one row per model, the main metric exactly the JSON's mean [95% CI] to 3 decimals
    headline = page.table("headline")
    assert set(headline) == rows
    for key, cells in headline.items():
        block = report if key == "trained" else report[key]
        assert cells[1] == fmt(block["metrics"][metric]), key
    # paired differences: the report's own, and (registration) those against the unregistered pairs and meta-init
    paired = page.table("paired")
    for key, diff in report["paired"].items():
        assert paired[key][1] == fmt(diff[metric], signed=True)
    if task == "registration":
        for key in ("unregistered", "meta_init"):
            diff = paired_differences(report["per_pair"]["dice"], {key: report[key]["per_pair"]["dice"]})[key]
            assert paired[key][1] == fmt(diff["dice"], signed=True)
        reference = paired_differences(report["per_pair"]["dice"], {"u": report["unregistered"]["per_pair"]["dice"]})
        low = reference["u"]["dice"]["ci95"][0]
    else:
        low = report["paired"]["untrained"][metric]["ci95"][0]
    assert ("not-better" in page.ids) == (low <= 0)

    # no patient anywhere (the split is counted), the data root by its folder name only
    identifiers = patient_identifiers(run)
    assert identifiers and not [p for p in identifiers if p in source]
    root = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])
    assert str(root) not in source and root.name in "".join(page.text)

    text = " ".join(page.text)
    for heading in ("How to read this page", "Headline results", "Figures", "Time taken", "Split", "Configuration"):
        assert heading in text
    state = json.loads((run / "state.json").read_text())
    assert f"{state['seconds']:.1f} s ({state['iterations']} iterations" in text
    assert report["evaluation_seconds"] > 0 and f"{report['evaluation_seconds']:.1f} s" in text


def test_page_tables_per_class_and_structure(cls_run: tuple[Path, str], seg_run: tuple[Path, str],
                                             reg_run: tuple[Path, str]) -> None:
    cls_text = " ".join(Page((cls_run[0] / "report.html").read_text()).text)
    cls_report = json.loads((cls_run[0] / "report.json").read_text())
    for name, v in cls_report["per_class"].items():
        assert f"{name} {fmt(v['recall'])}" in cls_text
    split = json.loads((cls_run[0] / "split.json").read_text())
    assert f"test patients {len(split['patients']['test'])}" in cls_text
    for task_run, structures in ((seg_run[0], "structures"), (reg_run[0], None)):
        report = json.loads((task_run / "report.json").read_text())
        text = " ".join(Page((task_run / "report.html").read_text()).text)
        for s, m in report["per_structure"].items():
            assert s in text and fmt(m["dice"]) in text and f"{m['hd95']['mean']:.2f}" in text
        if structures:
            assert f"held-out structures (evaluated) {len(report[structures])}" in text
    reg_text = " ".join(Page((reg_run[0] / "report.html").read_text()).text)
    assert "folding %" in reg_text and "SimpleITK affine (baseline)" in reg_text


def test_report_verb_rebuilds_the_page_and_finds_the_plots_of_tagged_reports(
        cls_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(cls_run[0], run, ignore=shutil.ignore_patterns("*.safetensors", "last", "tensorboard"))
    written = (run / "report.html").read_bytes()
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"page: {run / 'report.html'}"
    assert (run / "report.html").read_bytes().replace(str(run).encode(), b"") == \
        written.replace(str(cls_run[0]).encode(), b"")  # the same page as `evaluate` wrote

    # report_k.json shows accuracy_k.png and confusion_k.png, not the run's own plots
    shutil.copy(run / "report.json", run / "report_k.json")
    Image.new("RGB", (3, 2), "red").save(run / "accuracy_k.png")
    shutil.copy(run / "confusion.png", run / "confusion_k.png")
    assert main(["report", str(run), "--report", str(run / "report_k.json"), "--out", str(tmp_path / "k.html")]) == 0
    srcs = [img["src"] for img in Page((tmp_path / "k.html").read_text()).images]
    assert base64.b64encode((run / "accuracy_k.png").read_bytes()).decode() in srcs[1]
    assert base64.b64encode((run / "accuracy.png").read_bytes()).decode() not in "".join(srcs)
    assert not (run / "report_k.html").exists()


def test_report_verb_errors_are_one_line(cls_run: tuple[Path, str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(cls_run[0] / "config.yaml", empty / "config.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text(json.dumps({"task": "classification", "metrics": 3}))
    cases = [([str(tmp_path / "nope")], "not a run directory"),
             ([str(empty)], "run `evaluate` first"),
             ([str(empty), "--report", str(tmp_path / "list.json")], "not a fewscan evaluation report"),
             ([str(empty), "--report", str(tmp_path / "broken.json")], "malformed classification report"),
             ([str(cls_run[0]), "--out", str(cls_run[0] / "report.json")], "that is the report itself")]
    for argv, needle in cases:
        capsys.readouterr()
        assert main(["report", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not list(tmp_path.rglob("*.html")) and json.loads((cls_run[0] / "report.json").read_text())["task"]


def test_text_from_the_report_is_escaped(cls_run: tuple[Path, str], tmp_path: Path) -> None:
    from pipeline.common.page import write_page

    run = tmp_path / "run"
    shutil.copytree(cls_run[0], run, ignore=shutil.ignore_patterns("*.safetensors", "last", "tensorboard"))
    report = json.loads((run / "report.json").read_text())
    evil = '<img src="x" onerror="alert(1)">'
    report["method"] = "<script>alert(1)</script>"
    report["per_class"] = {evil: next(iter(report["per_class"].values()))}
    (run / "report.json").write_text(json.dumps(report))
    page = Page(write_page(run, run / "report.json").read_text())
    assert "script" not in page.tags and all(img["src"].startswith("data:image/png") for img in page.images)
    assert evil in "".join(page.text) and "trained (<script>alert(1)</script>)" in "".join(page.text)


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no headless Chromium (chromium, chromium-browser, google-chrome)")
def test_page_renders_in_headless_chromium(seg_run: tuple[Path, str], tmp_path: Path) -> None:
    shot = tmp_path / "page.png"
    subprocess.run([str(BROWSER), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                    "--window-size=1200,1600", f"--screenshot={shot}", (seg_run[0] / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("L")
    histogram = image.histogram()
    dark = sum(histogram[:200]) / (image.width * image.height)
    assert image.size == (1200, 1600) and 0.005 < dark < 0.9  # text and plots on a light page, not blank
