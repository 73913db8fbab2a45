"""Few-shot segmentation benchmarks (issue #6). Prints markdown tables; raw results go to WORK/*.json.

    .venv/bin/python benchmarks/bench_segmentation.py schedule [--cases 300]  # ready config's default schedule
    .venv/bin/python benchmarks/bench_segmentation.py real [--iterations 300]  # TotalSegmentator example organs
    .venv/bin/python benchmarks/bench_segmentation.py speed                    # 3D: query time vs atlas, memory
    .venv/bin/python benchmarks/bench_segmentation.py chaos [--run DIR]         # chaos_t2_mr: propagation vs atlas

`schedule` generates a Decathlon folder of small synthetic MR-like crops (40x50x40, three labelled organs) and
runs `configs/segment_decathlon_ssl.yaml` unchanged except `data.root`: train + evaluate at K=1, then the same
weights evaluated at K=5. `real` turns `shared/data/totalsegmentator_example` (2 CT subjects, 1 MR subject) into
a temporary Decathlon folder (3 mm grid, intensities harmonised to [0, 1], one label table) and evaluates
held-out liver, spleen and kidneys (SSL-ALPNet Setting 1 and 2). `chaos` trains `configs/segment_propagate.yaml`
on `shared/data/chaos_t2_mr` (20 real MR subjects; on a 4 x 4 x 7.7 mm grid, the only other change), then scores
learned label propagation, its untrained network and the SimpleITK atlas on the same fixed 1-shot episodes (10 per
organ, query and support from the 10 held-out patients), then K=5 on the same weights, with paired differences.
The machine load is recorded with each result.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from nibabel.processing import resample_from_to, resample_to_output  # noqa: E402

from datasets.synth_decathlon import write_synthetic_organs  # noqa: E402
from pipeline.common.config import load_config  # noqa: E402
from pipeline.segmentation.evaluate import evaluate, summary_table  # noqa: E402
from pipeline.segmentation.train import train  # noqa: E402

CONFIG = REPO / "configs" / "segment_decathlon_ssl.yaml"
PROPAGATE = REPO / "configs" / "segment_propagate.yaml"
CHAOS_SETS = ["transforms.spacing=[4.0, 4.0, 7.7]"]  # the native 7.7 mm slices kept: 80 x 80 x <= 48 voxels
HELD_OUT = ["liver", "spleen", "kidney_left", "kidney_right"]


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load avg {one:.1f}/{five:.1f}/{fifteen:.1f} on {os.cpu_count()} cores"


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, *args):  # noqa: ANN001, ANN201
    wall, cpu, before = time.perf_counter(), cpu_seconds(), load()
    out = fn(*args)
    return out, {"wall_s": time.perf_counter() - wall, "cpu_s": cpu_seconds() - cpu, "load_before": before,
                 "load_after": load()}


def table(reports: dict[str, dict]) -> str:
    """Markdown: one row per (run, method) with overall and per-structure Dice (95% CI) and seconds per query."""
    structures = sorted({s for r in reports.values() for s in r["per_structure"]})
    head = "| run | method | Dice (95% CI) | " + " | ".join(structures) + " | s/query |"
    lines = [head, "|" + "---|" * (4 + len(structures))]
    for run, rep in reports.items():
        blocks = {rep["method"]: rep, "untrained": rep["untrained"],
                  **{k.removeprefix("baseline_"): v for k, v in rep.items() if k.startswith("baseline_")}}
        for name, b in blocks.items():
            d = b["metrics"]["dice"]
            cells = []
            for s in structures:
                m = b["per_structure"].get(s, {}).get("dice")
                cells.append(f"{m['mean']:.2f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]" if m else "-")
            lines.append(f"| {run} | {name} | {d['mean']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}] | "
                         + " | ".join(cells) + f" | {b['seconds_per_query']:.2f} |")
    return "\n".join(lines)


def reevaluate(run: Path, shots: int) -> dict:
    """The same trained weights evaluated at another K (`evaluate --set shots=K`: fresh fixed episodes, own files)."""
    return evaluate(run, overrides=[f"shots={shots}"])


# --- schedule -----------------------------------------------------------------------------------------
def bench_schedule(work: Path, n_cases: int) -> dict:
    data = work / f"synth_{n_cases}"
    if not (data / "dataset.json").is_file():
        write_synthetic_organs(data, n_cases=n_cases, shape=(40, 50, 40), seed=0)
    cfg = load_config(CONFIG, [f"data.root={data}"])
    run = work / f"schedule_{n_cases}"
    if run.exists():
        shutil.rmtree(run)
    _, t_train = timed(train, cfg, run)
    rep1, t_eval = timed(evaluate, run)
    rep5, t_eval5 = timed(reevaluate, run, 5)
    result = {"cases": n_cases, "iterations": cfg.train.iterations, "train": t_train, "evaluate_k1": t_eval,
              "evaluate_k5": t_eval5, "total_wall_s": t_train["wall_s"] + t_eval["wall_s"],
              "reports": {"K=1": rep1, "K=5": rep5}}
    print(summary_table(rep1), "\n", summary_table(rep5))
    print(table({"synthetic K=1": rep1, "synthetic K=5": rep5}))
    print(json.dumps({k: v for k, v in result.items() if k != "reports"}, indent=1))
    return result


# --- real data ----------------------------------------------------------------------------------------
def totalseg_folder(src: Path, out: Path, spacing: float = 3.0) -> Path:
    """3 subjects as a Decathlon folder: 3 mm grid, CT window [-200, 300] / MR percentiles to [0, 1], one
    label table (TotalSegmentator's `total` and `total_mr` names unified)."""
    from datasets.dicom import load_series

    names = json.loads((src / "class_map_total.json").read_text())
    subjects = [("ct_a", nib.load(str(src / "example_ct_sm.nii.gz")), src / "example_seg.nii.gz", "ct", "total"),
                ("mr_a", nib.load(str(src / "example_mr_sm.nii.gz")), src / "example_seg_mr.nii.gz", "mr", "total_mr")]
    vol = load_series(src / "example_ct_dicom")
    subjects.append(("ct_b", vol.to_nifti(), src / "example_seg_dicom.nii.gz", "ct", "total"))
    table_out = sorted({n for key in ("total", "total_mr") for n in names[key].values()})
    value_of = {n: i + 1 for i, n in enumerate(table_out)}
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(exist_ok=True)
    training = []
    for case_id, img, label_path, modality, key in subjects:
        img = resample_to_output(nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine), [spacing] * 3,
                                 order=1)
        arr = np.asarray(img.dataobj, np.float32)
        low, high = (-200.0, 300.0) if modality == "ct" else tuple(np.percentile(arr, [0.5, 99.5]))
        arr = np.clip((arr - low) / (high - low), 0, 1).astype(np.float32)
        lab = nib.load(str(label_path))
        lab = resample_from_to(nib.Nifti1Image(np.asarray(lab.dataobj).astype(np.int16), lab.affine), img, order=0)
        src_names = {int(k): v for k, v in names[key].items()}
        lab_arr = np.asarray(lab.dataobj)
        unified = np.zeros(lab_arr.shape, np.uint8)
        for v in np.unique(lab_arr[lab_arr > 0]):
            unified[lab_arr == v] = value_of[src_names[int(v)]]
        nib.save(nib.Nifti1Image(arr, img.affine), str(out / "imagesTr" / f"{case_id}.nii.gz"))
        nib.save(nib.Nifti1Image(unified, img.affine), str(out / "labelsTr" / f"{case_id}.nii.gz"))
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    spec = {"name": "TotalSegExample", "modality": {"0": "harmonised CT/MR [0,1]"},
            "labels": {"0": "background", **{str(v): n for n, v in value_of.items()}}, "training": training}
    (out / "dataset.json").write_text(json.dumps(spec, indent=1))
    return out


def bench_real(work: Path, data_root: Path, iterations: int, only: list[str] | None, k2: bool = True,
               baselines: bool = True) -> dict:
    folder = work / "totalseg_dec"
    if not (folder / "dataset.json").is_file():
        totalseg_folder(data_root / "totalsegmentator_example", folder)
    # Intensities are already in [0, 1]; MR percentile normalisation of them is (nearly) the identity.
    common = [f"data.root={folder}", f"segmentation.held_out={HELD_OUT}", "segmentation.test_patients=0",
              f"train.iterations={iterations}", "episodes.eval_episodes=3", "episodes.queries=2",
              "segmentation.crop=[64, 64, 48]"]
    runs = {
        "ssl-proto": ["segmentation.supervision=self", "segmentation.baselines=[finetune, atlas]"],
        "s1-proto": ["segmentation.supervision=labels", "segmentation.setting=1", "segmentation.baselines=[]"],
        "s2-proto": ["segmentation.supervision=labels", "segmentation.setting=2", "segmentation.baselines=[]"],
        "s1-maml": ["segmentation.supervision=labels", "segmentation.method=maml", "segmentation.baselines=[]",
                    "segmentation.inner_steps=5"],
    }
    results: dict = {"load_start": load(), "runs": {}}
    reports: dict[str, dict] = {}
    for name, extra in runs.items():
        if only and name not in only:
            continue
        cfg = load_config(CONFIG, [*common, *extra, *([] if baselines else ["segmentation.baselines=[]"])])
        run = work / f"real_{name}"
        if run.exists():
            shutil.rmtree(run)
        _, t_train = timed(train, cfg, run)
        rep1, t1 = timed(evaluate, run)
        reports[f"{name} K=1"] = rep1
        results["runs"][name] = {"train": t_train, "eval_k1": t1, "K=1": rep1}
        print(table({f"{name} K=1": rep1}), flush=True)
        if k2:  # the same weights with 2 support scans (5-shot needs 6 subjects; the example has 3)
            rep2, t2 = timed(reevaluate, run, 2)
            reports[f"{name} K=2"] = rep2
            results["runs"][name].update(eval_k2=t2, **{"K=2": rep2})
            print(table({f"{name} K=2": rep2}), flush=True)
    results["load_end"] = load()
    print(table(reports))
    return results


def paired_text(reports: dict[str, dict]) -> str:
    """One line per (run, comparison): the method minus each other block, Dice mean [95% CI] over episodes."""
    return "\n".join(f"{run}: {rep['method']} minus {other.removeprefix('baseline_')}: "
                     f"{d['dice']['mean']:+.3f} [{d['dice']['ci95'][0]:+.3f}, {d['dice']['ci95'][1]:+.3f}]"
                     for run, rep in reports.items() for other, d in rep["paired"].items())


def bench_chaos(work: Path, data_root: Path, iterations: int, run: Path | None, k5_episodes: int,
                steps: list[int]) -> dict:
    """Train (unless `run` holds a trained run) and evaluate learned label propagation on chaos_t2_mr."""
    cfg = load_config(PROPAGATE, [f"data.root={data_root / 'chaos_t2_mr'}", *CHAOS_SETS,
                                  f"train.iterations={iterations}"])
    run = run or work / "chaos_propagate"
    result: dict = {"load_start": load(), "run": str(run)}
    if not (run / "model.safetensors").is_file():
        if run.exists():
            shutil.rmtree(run)
        _, result["train"] = timed(train, cfg, run)
    reports = {}
    reports["K=1"], result["evaluate_k1"] = timed(evaluate, run)
    print(table({"K=1": reports["K=1"]}), "\n" + paired_text({"K=1": reports["K=1"]}), flush=True)
    for n in steps:  # other instance-optimisation step counts on the same weights and episodes
        key = f"K=1 instance_steps={n}"
        reports[key], result[f"evaluate_{key}"] = timed(evaluate, run, None, None,
                                                        [f"registration.instance_steps={n}"])
        print(table({key: reports[key]}), flush=True)
    if k5_episodes:
        key = "K=5"
        reports[key], result["evaluate_k5"] = timed(evaluate, run, None, None,
                                                    ["shots=5", f"episodes.eval_episodes={k5_episodes}"])
        print(table({key: reports[key]}), "\n" + paired_text({key: reports[key]}), flush=True)
    result.update(load_end=load(), reports=reports)
    print(table(reports), "\n" + paired_text(reports))
    return result


# --- speed / memory -----------------------------------------------------------------------------------
def bench_speed(work: Path) -> dict:
    """3D mode on the synthetic crops: seconds per query (proto vs atlas) and peak RSS of 3D meta-training."""
    data = work / "synth_40"
    if not (data / "dataset.json").is_file():
        write_synthetic_organs(data, n_cases=40, shape=(40, 50, 40), seed=0)
    run = work / "speed_3d"
    if run.exists():
        shutil.rmtree(run)
    cmd = [sys.executable, "-c",
           "import resource, sys; sys.path.insert(0, '.'); from pipeline.__main__ import main; "
           "rc = main(sys.argv[1:]); "
           "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(rc)",
           "train", str(CONFIG), "--set", f"data.root={data}", "--set", "segmentation.mode=3d",
           "--set", "train.iterations=100", "--set", "episodes.eval_episodes=5",
           "--set", "segmentation.baselines=[atlas]", "--out", str(run)]
    base = subprocess.run([sys.executable, "-c", "import resource, torch, monai; print(resource.getrusage("
                           "resource.RUSAGE_SELF).ru_maxrss / 1024)"], capture_output=True, text=True, cwd=REPO)
    before, t0 = load(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    peak = [float(x.split()[1]) for x in proc.stdout.splitlines() if x.startswith("PEAK_RSS_MB")]
    result = {"crop": load_config(CONFIG).segmentation.crop, "train_wall_s": time.perf_counter() - t0,
              "peak_rss_mb_3d_training": peak[0] if peak else None, "rss_mb_after_imports": float(base.stdout),
              "load_before": before, "load_after": load()}
    rep, t_eval = timed(evaluate, run)
    result.update(evaluate=t_eval, report=rep)
    print(table({"synthetic 3D K=1": rep}))
    print(json.dumps({k: v for k, v in result.items() if k != "report"}, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["schedule", "real", "speed", "chaos"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/fewscan_bench_seg"))
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--iterations", type=int, default=300, help="real: 300; chaos: the config's 400 unless set")
    ap.add_argument("--run", type=Path, default=None, help="chaos: evaluate this trained run instead of training")
    ap.add_argument("--k5-episodes", type=int, default=5, help="chaos: K=5 episodes per organ (0: skip K=5)")
    ap.add_argument("--steps", type=int, nargs="*", default=[0], help="chaos: more instance step counts to score")
    ap.add_argument("--only", nargs="*", default=None, help="real: run only these configurations")
    ap.add_argument("--no-k2", action="store_true", help="real: skip the K=2 re-evaluation")
    ap.add_argument("--no-baselines", action="store_true", help="real: skip fine-tuning and atlas (slow)")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("FEWSCAN_DATA", REPO.parent / "shared" / "data")))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.part == "schedule":
        result = bench_schedule(args.work, args.cases)
    elif args.part == "real":
        result = bench_real(args.work, args.data, args.iterations, args.only, not args.no_k2, not args.no_baselines)
    elif args.part == "chaos":
        iterations = args.iterations if "--iterations" in sys.argv else load_config(PROPAGATE).train.iterations
        result = bench_chaos(args.work, args.data, iterations, args.run, args.k5_episodes, args.steps)
    else:
        result = bench_speed(args.work)
    suffix = "_" + "_".join(args.only) if args.only else ""
    (args.work / f"results_{args.part}{suffix}.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
