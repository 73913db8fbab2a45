"""Registration benchmark: schedule estimate, fewscan vs SimpleITK, peak memory, real-data pairs.

    .venv/bin/python benchmarks/bench_registration.py schedule --iterations 20 --threads 1
    .venv/bin/python benchmarks/bench_registration.py memory --threads 1
    .venv/bin/python benchmarks/bench_registration.py real --threads 1
    .venv/bin/python benchmarks/bench_registration.py chaos-io \
        "instance_scales=[4, 2];instance_coarse_steps=100;instance_steps=30;instance_reg_weight=2" \
        --threads 1 --eval-pairs 40                  # variants first: argparse takes no positionals after options

`schedule` generates a Decathlon folder of synthetic 40x50x40 MR-like volumes with labels, trains the ready config
(`configs/register_decathlon.yaml`) for a few meta-iterations, evaluates it (fewscan, SimpleITK affine and affine +
demons on the same held-out pairs) and extrapolates the default schedule to a few hundred crops.
`memory` measures the peak resident memory of one training step and one prediction at 64^3 and 128^3 (each in a
fresh process). `real` registers TotalSegmentator CT<->CT and MR<->CT pairs (labels matched by name) and an MNI152
pair with a known synthetic deformation. Results print as Markdown rows for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DATA = Path(os.environ.get("FEWSCAN_DATA", REPO.parent / "shared" / "data"))


def matmul_gflops() -> float:
    """fp32 matmul throughput now, with the current torch threads (unloaded reference: ~70 GFLOP/s per thread,
    ~140 for 2 threads, /work/shared/NOTES.md); the ratio shows how much the shared load slows this run."""
    a, b = torch.rand(1024, 1024), torch.rand(1024, 1024)
    a @ b
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    return 10 * 2 * 1024**3 / (time.perf_counter() - t) / 1e9


def load_line() -> str:
    return (f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()}, matmul {matmul_gflops():.0f} GFLOP/s")


# --- schedule ----------------------------------------------------------------------------------------------------
def schedule(args: argparse.Namespace) -> None:
    from datasets.synth_decathlon import write_synthetic_subjects
    from pipeline.common.config import load_config
    from pipeline.registration.evaluate import evaluate, summary_table
    from pipeline.registration.train import train

    work = Path(args.work)
    root = work / "SynthDecathlon"
    if not (root / "dataset.json").is_file():
        t = time.perf_counter()
        write_synthetic_subjects(root, n_cases=args.cases, shape=(40, 50, 40), seed=0)
        print(f"generated {args.cases} volumes in {time.perf_counter() - t:.1f} s")
    cfg = load_config(REPO / "configs" / "register_decathlon.yaml",
                      [f"data.root={root}", f"train.iterations={args.iterations}",
                       f"registration.eval_pairs={args.eval_pairs}", *args.set])
    t = time.perf_counter()
    run = train(cfg, work / "run")
    train_s = time.perf_counter() - t
    state = json.loads((run / "state.json").read_text())
    t = time.perf_counter()
    report = evaluate(run)
    eval_s = time.perf_counter() - t
    print(summary_table(report))
    per_it = state["seconds"] / max(1, args.iterations)
    per_case_prep = state["prepare_seconds"] / max(1, len({c["image"] for p in json.loads(
        (run / "pairs.json").read_text())["train"] for c in p["cases"]}))
    full = load_config(REPO / "configs" / "register_decathlon.yaml")
    n_cases = args.extrapolate_cases
    sitk_s = sum(report[k]["metrics"]["seconds"]["mean"] for k in ("baseline_affine", "baseline_sitk") if k in report)
    net_s = report["metrics"]["seconds"]["mean"]
    est = {"prepare": per_case_prep * n_cases, "meta-train": per_it * full.train.iterations,
           "adapt": report.get("adapt_seconds", 0.0),
           "evaluate": full.registration.eval_pairs * (2 * net_s + sitk_s)}
    print(f"\nmeasured ({load_line()}): train {train_s:.0f} s for {args.iterations} meta-iterations "
          f"({per_it:.2f} s each), prepare {per_case_prep:.3f} s per volume, evaluate {eval_s:.0f} s")
    print(f"estimate for the default schedule on {n_cases} volumes: " +
          ", ".join(f"{k} {v / 60:.1f} min" for k, v in est.items()) + f" -> total {sum(est.values()) / 60:.1f} min")
    print(f"seconds per pair: fewscan {net_s:.3f}, SimpleITK {report.get('baseline_sitk', {}).get('kind', '')} "
          f"{report.get('baseline_sitk', {}).get('metrics', {}).get('seconds', {}).get('mean', float('nan')):.2f}")
    (work / "schedule.json").write_text(json.dumps({"report": report, "estimate_s": est, "per_iteration_s": per_it,
                                                     "load": load_line()}, indent=2))


# --- memory --------------------------------------------------------------------------------------------------------
def memory_one(size: int, mode: str) -> None:
    """Peak RSS of one training step (batch 1) or one prediction at size^3, printed as JSON (child process)."""
    from pipeline.common.config import RegistrationConfig
    from pipeline.registration.network import Losses, RegistrationNet, predict

    rcfg = RegistrationConfig()
    net = RegistrationNet(rcfg, (size,) * 3)
    x = torch.rand(1, 1, size, size, size)
    lab = (x > 0.5).float()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if mode == "train":
        losses = Losses(rcfg, 2)
        terms = losses(net(x, x.flip(2)), (x, x.flip(2), lab, lab.flip(2)))
        terms["total"].backward()
    else:
        predict(net, x, x.flip(2))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"size": size, "mode": mode, "peak_mb": peak / 1024, "increase_mb": (peak - base) / 1024,
                      "seconds": time.perf_counter() - t}))


def memory(args: argparse.Namespace) -> None:
    print(f"| volume | step | peak RSS (MB) | increase over the loaded model (MB) | seconds | ({load_line()})")
    for size in (64, 128):
        for mode in ("predict", "train"):
            out = subprocess.run([sys.executable, __file__, "memory-one", str(size), mode, "--threads",
                                  str(args.threads)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {size}^3 | {mode} | {r['peak_mb']:.0f} | {r['increase_mb']:.0f} | {r['seconds']:.2f} |")


# --- real data -----------------------------------------------------------------------------------------------------
def _names(table: str) -> dict[int, str]:
    spec = json.loads((DATA / "totalsegmentator_example" / "class_map_total.json").read_text())[table]
    return {int(k): v for k, v in spec.items()}


def _harmonise(fixed_lab: np.ndarray, fixed_names: dict[int, str], moving_lab: np.ndarray,
               moving_names: dict[int, str]) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Keep the structures present in both label maps, renumbered 1..n by name."""
    present_f = {fixed_names[v] for v in np.unique(fixed_lab) if v in fixed_names}
    present_m = {moving_names[v] for v in np.unique(moving_lab) if v in moving_names}
    common = sorted(present_f & present_m)
    code = {n: i + 1 for i, n in enumerate(common)}
    out = []
    for lab, names in ((fixed_lab, fixed_names), (moving_lab, moving_names)):
        new = np.zeros(lab.shape, np.int64)
        for v, n in names.items():
            if n in code:
                new[lab == v] = code[n]
        out.append(new)
    return out[0], out[1], {str(i): n for n, i in code.items()}


def _real_pairs(only: str | None = None) -> list[dict]:
    """TotalSegmentator CT<-CT, CT<-MR and the MNI152 pair (`only`: keep names containing this text)."""
    if only and only.lower() in "mni152":
        return [_mni_pair()]
    from datasets.sources import load_label_map, load_nifti
    from datasets.volume import Volume
    from datasets.volume_io import load_volume
    from pipeline.registration.deformation import resample_to

    ts = DATA / "totalsegmentator_example"
    ct = load_nifti(ts / "example_ct_sm.nii.gz")
    ct_lab = load_label_map(ts / "example_seg.nii.gz")
    mr = load_nifti(ts / "example_mr_sm.nii.gz")
    mr_lab = load_label_map(ts / "example_seg_mr.nii.gz")
    ct2 = load_volume(ts / "example_ct_dicom")
    ct2_lab = resample_to(load_label_map(ts / "example_seg_dicom.nii.gz"), ct2, nearest=True)  # world coordinates
    total, total_mr = _names("total"), _names("total_mr")
    pairs = []
    for name, fixed, fl, fn, moving, ml, mn, mono in [
        ("TotalSegmentator CT<-CT (2 subjects)", ct, ct_lab, total, ct2, ct2_lab, total, True),
        ("TotalSegmentator CT<-MR (2 subjects)", ct, ct_lab, total, mr, mr_lab, total_mr, False),
    ]:
        ml_on_own = ml.array
        f_arr, m_arr, structures = _harmonise(fl.array, fn, ml_on_own, mn)
        pairs.append({"name": name, "fixed": fixed, "fixed_lab": Volume(f_arr, fl.affine),
                      "moving": moving, "moving_lab": Volume(m_arr, ml.affine), "structures": structures,
                      "mono": mono, "modalities": ("CT", "CT" if mono else "MRI")})
    pairs.append(_mni_pair())
    return [p for p in pairs if not only or only.lower() in p["name"].lower()]


def _mni_pair() -> dict:
    """MNI152 T1 (3 mm) as fixed; moving = the template under a known smooth deformation and small affine."""
    from scipy import ndimage

    from datasets.sources import load_nifti
    from datasets.volume import Volume
    from pipeline.registration.deformation import resample_to

    mni = DATA / "nilearn_mni152_2009"
    t1 = load_nifti(mni / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    gm = load_nifti(mni / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
    wm = load_nifti(mni / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
    grid_affine = t1.affine.copy()
    grid_affine[:3, :3] *= 3.0
    shape = tuple(int(s) // 3 for s in t1.array.shape)
    grid = Volume(np.zeros(shape, np.float32), grid_affine)
    fixed = resample_to(t1, grid)
    g, w = resample_to(gm, grid).array, resample_to(wm, grid).array
    labels = np.where((g > 0.5 * g.max()) & (g >= w), 1, np.where(w > 0.5 * w.max(), 2, 0)).astype(np.int64)
    rng = np.random.default_rng(0)
    coords = np.indices(shape).astype(float)
    disp = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 8.0) for _ in range(3)])
    disp *= 3.0 / np.abs(disp).max()  # up to 3 voxels (9 mm)
    centre = (np.asarray(shape) - 1)[:, None, None, None] / 2
    rot = np.eye(3) + np.array([[0, -0.05, 0], [0.05, 0, 0], [0, 0, 0]])
    coords = np.einsum("ab,b...->a...", rot, coords - centre) + centre + disp + np.array([2, -3, 1])[:, None, None,
                                                                                                         None]
    moving = ndimage.map_coordinates(fixed.array, coords, order=1, mode="constant")
    moving_lab = ndimage.map_coordinates(labels, coords, order=0, mode="constant")
    return {"name": "MNI152 T1 3 mm <- known deformation", "fixed": fixed, "fixed_lab": Volume(labels, grid_affine),
            "moving": Volume(moving.astype(np.float32), grid_affine), "moving_lab": Volume(moving_lab, grid_affine),
            "structures": {"1": "grey_matter", "2": "white_matter"}, "mono": True, "modalities": ("MRI", "MRI")}


def _prepared(vol, lab, modality: str, size):
    from pipeline.common.config import validate
    from pipeline.registration.episodes import preprocess

    kind = "ct" if modality == "CT" else "mr"
    cfg = validate({"task": "registration", "transforms": {"preset": kind, "ct_window": "soft_tissue",
                                                             "spacing": None, "volume_size": size}})
    return preprocess(cfg, vol, lab, 0, modality)


def real(args: argparse.Namespace) -> None:
    from pipeline.common.config import RegistrationConfig
    from pipeline.registration.classical import register_sitk, warp_labels
    from pipeline.registration.deformation import resample_to, transform_to_ddf, warp_array
    from pipeline.registration.evaluate import pair_metrics
    from pipeline.registration.network import Losses, RegistrationNet, adapted, predict

    if not DATA.is_dir():
        print(f"real data not found at {DATA}")
        return
    print(f"({load_line()})")
    print("| pair | method | Dice | HD95 mm | folding % | SD logJ | s/pair |")
    print("|---|---|---|---|---|---|---|")
    for pair in _real_pairs(args.only):
        size = [int(np.ceil(s / 16) * 16) for s in pair["fixed"].array.shape[:3]]
        fv, fl = _prepared(pair["fixed"], pair["fixed_lab"], pair["modalities"][0], size)
        mv, ml = _prepared(pair["moving"], pair["moving_lab"], pair["modalities"][1], None)
        rows = []
        lab_grid = resample_to(ml, fv, nearest=True)
        zero = np.zeros((3, *fv.array.shape), np.float32)
        rows.append(("unregistered (world)", pair_metrics(lab_grid.array, fl.array, zero, fv.spacing,
                                                          pair["structures"]), 0.0))
        kinds = ["affine", "affine+demons" if pair["mono"] else "affine+bspline"]
        affine_t = None
        for kind in kinds:
            _, tr, sec = register_sitk(fv, mv, kind)
            affine_t = tr if kind == "affine" else affine_t
            rows.append((f"SimpleITK {kind}", pair_metrics(warp_labels(ml, fv, tr).array, fl.array,
                                                           transform_to_ddf(tr, fv), fv.spacing,
                                                           pair["structures"]), sec))
        # fewscan: SimpleITK affine, then LocalNet instance-optimised on this pair (no labels used)
        rcfg = RegistrationConfig(prealign="none", similarity="lncc" if pair["mono"] else "mi",
                                  half_res=True, reg_weight=1.0)
        start = time.perf_counter()
        _, tr, _ = register_sitk(fv, mv, "affine")
        aligned, aligned_lab = resample_to(mv, fv, transform=tr), resample_to(ml, fv, nearest=True, transform=tr)
        torch.manual_seed(0)
        net = RegistrationNet(rcfg, fv.array.shape)
        x = torch.from_numpy(aligned.array)[None, None].float()
        y = torch.from_numpy(fv.array)[None, None].float()
        net = adapted(net, Losses(rcfg, 1), lambda x=x, y=y: (x, y, None, None), args.instance_steps, 1e-3,
                      labels=False)
        ddf = predict(net, x, y)[0].numpy()
        sec = time.perf_counter() - start
        # total field for the Jacobian: x -> x + d(x) + a(x + d(x)) (network field, then the affine's)
        affine_ddf = transform_to_ddf(tr, fv)
        total = ddf + np.stack([warp_array(affine_ddf[c], ddf) for c in range(3)])
        rows.append((f"fewscan (affine + LocalNet, {args.instance_steps} instance steps)",
                     pair_metrics(warp_array(aligned_lab.array, ddf, nearest=True), fl.array, total, fv.spacing,
                                  pair["structures"]), sec))
        for method, m, sec in rows:
            print(f"| {pair['name']} ({len(pair['structures'])} structures) | {method} | {m['dice']:.3f} | "
                  f"{m['hd95']:.1f} | {m['folding'] * 100:.2f} | {m['log_jac_std']:.3f} | {sec:.2f} |")


# --- chaos: real inter-subject MR ---------------------------------------------------------------------------------
CHAOS_SETS = ["transforms.spacing=[4.0, 4.0, 7.7]", "transforms.volume_size=[80, 80, 48]",
              "registration.test_patients=0.5", "registration.adapt_patients=2"]


def chaos(args: argparse.Namespace) -> None:
    """chaos_t2_mr (20 real abdominal MR T2 subjects): the ready config on 4 mm in-plane grids, 10 training and 10
    held-out patients (2 adapt, 8 evaluate: up to 56 ordered inter-subject pairs), every baseline on the same pairs,
    then the same trained run with `instance_steps` per pair; paired differences against affine + demons."""
    from pipeline.common.config import load_config
    from pipeline.common.metrics import paired_differences
    from pipeline.common.run import load_run_config, load_weights, seed_everything
    from pipeline.registration.episodes import PairData
    from pipeline.registration.evaluate import _block, _network_blocks, _sitk_rows, evaluate, summary_table
    from pipeline.registration.network import Losses
    from pipeline.registration.train import build_net, n_labels, train

    root = DATA / "chaos_t2_mr"
    if not (root / "dataset.json").is_file():
        print(f"chaos_t2_mr not found at {root}")
        return
    work = Path(args.work)
    sets = [f"data.root={root}", *CHAOS_SETS, f"train.iterations={args.iterations}",
            f"registration.eval_pairs={args.eval_pairs}", "train.log_every=10", *args.set]
    print(f"({load_line()})", flush=True)
    run = work / "chaos_run"
    t = time.perf_counter()
    if not (run / "model.safetensors").is_file():
        train(load_config(REPO / "configs" / "register_decathlon.yaml", sets), run)
    print(f"train {time.perf_counter() - t:.0f} s", flush=True)
    full = [f"registration.instance_steps={args.chaos_instance[0]}", f"registration.instance_lr={args.instance_lr}"]
    reports = {args.chaos_instance[0]: evaluate(run, overrides=full)}  # with every SimpleITK baseline
    print(summary_table(reports[args.chaos_instance[0]]), flush=True)
    pairs = json.loads((run / "pairs.json").read_text())
    for steps in args.chaos_instance[1:]:  # the network alone, or other step counts: the network rows only
        # (`evaluate --set` may not switch the SimpleITK baselines off, and they cost ~7 s per pair again)
        cfg = load_run_config(run, [f"registration.instance_steps={steps}",
                                    f"registration.instance_lr={args.instance_lr}"])
        seed_everything(cfg.seed)
        data = PairData(cfg, pairs["eval"], labels_required=True)
        model = load_weights(build_net(cfg, data.shape), run / "model.safetensors")
        reports[steps] = _network_blocks(cfg, model, Losses(cfg.registration, n_labels(pairs["eval"])), data,
                                         pairs["adapt"])
    base = reports[args.chaos_instance[0]]
    if args.bspline:
        block = _block(_sitk_rows(PairData(load_config(run / "config.yaml"), pairs["eval"]), "affine+bspline"))
        base["baseline_bspline"] = block
        print(f"SimpleITK affine+bspline: Dice {block['metrics']['dice']['mean']:.3f}, "
              f"{block['metrics']['seconds']['mean']:.2f} s/pair", flush=True)
    demons = base["baseline_sitk"]["per_pair"]["dice"]
    for steps, rep in reports.items():
        for key in ("meta_init", None):
            block = rep[key] if key else rep
            diff = paired_differences(block["per_pair"]["dice"], {"demons": demons})["demons"]["dice"]
            print(f"instance_steps {steps} {key or 'adapted'}: fewscan {block['metrics']['dice']['mean']:.3f}, "
                  f"folding {block['metrics']['folding']['mean'] * 100:.3f}%, "
                  f"{block['metrics']['seconds']['mean']:.2f} s/pair; minus demons {diff}", flush=True)
    (work / "chaos.json").write_text(json.dumps({str(k): v for k, v in reports.items()}, indent=2, default=str))


def chaos_io(args: argparse.Namespace) -> None:
    """chaos_t2_mr: test-time instance optimisation alone (`network.refine` from a zero field, no network, no
    labels) against SimpleITK affine + demons on the `chaos` held-out pairs. Each positional argument is one
    variant, `;`-separated `registration.*` settings."""
    from pipeline.common.config import load_config
    from pipeline.common.metrics import paired_differences
    from pipeline.registration.deformation import warp_array
    from pipeline.registration.episodes import PairData
    from pipeline.registration.evaluate import _sitk_rows, pair_metrics
    from pipeline.registration.network import Losses, refine
    from pipeline.registration.train import n_labels, train

    work, root = Path(args.work), DATA / "chaos_t2_mr"
    run = work / "chaos_pairs"  # no training: the run only fixes the held-out pairs, as `chaos` draws them
    if not (run / "pairs.json").is_file():
        train(load_config(REPO / "configs" / "register_decathlon.yaml",
                          [f"data.root={root}", *CHAOS_SETS, "train.iterations=0", "registration.prealign=none",
                           f"registration.eval_pairs={args.eval_pairs}"]), run)
    pairs = json.loads((run / "pairs.json").read_text())["eval"]
    data = PairData(load_config(run / "config.yaml"), pairs, labels_required=True)
    cached = work / "chaos_demons.json"
    if not cached.is_file():
        cached.write_text(json.dumps(_sitk_rows(data, "affine+demons"), default=float))
    demons = json.loads(cached.read_text())
    print(f"({load_line()}) SimpleITK affine + demons: Dice {np.mean([r['dice'] for r in demons]):.3f}, "
          f"{np.mean([r['seconds'] for r in demons]):.2f} s/pair", flush=True)
    for variant in args.rest:
        cfg = load_config(run / "config.yaml", [f"registration.{s.strip()}" for s in variant.split(";")])
        losses, rows = Losses(cfg.registration, n_labels(pairs)), []
        for i, pair in enumerate(pairs):
            _, fv, ml, fl = data.volumes(i)
            moving, fixed = data.batch([i])[:2]
            start = time.perf_counter()
            ddf = refine(torch.zeros(1, 3, *fixed.shape[2:]), moving, fixed, losses, cfg.registration.instance_steps,
                         cfg.registration.instance_lr)[0].numpy()
            seconds = time.perf_counter() - start
            warped = warp_array(ml.array, ddf, nearest=True)
            rows.append({**pair_metrics(warped, fl.array, ddf, fv.spacing, pair["structures"]), "seconds": seconds})
        dice = [r["dice"] for r in rows]
        diff = paired_differences(dice, {"demons": [r["dice"] for r in demons]})["demons"]["dice"]
        print(f"{variant}: Dice {np.mean(dice):.3f}, folding {100 * np.mean([r['folding'] for r in rows]):.3f}%, "
              f"{np.mean([r['seconds'] for r in rows]):.2f} s/pair; minus demons {diff['mean']:+.3f} "
              f"[{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}] over {diff['n']} pairs", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["schedule", "memory", "memory-one", "real", "chaos", "chaos-io"])
    parser.add_argument("rest", nargs="*")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/fewscan_bench_registration")
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--eval-pairs", type=int, default=10)
    parser.add_argument("--extrapolate-cases", type=int, default=300)
    parser.add_argument("--instance-steps", type=int, default=50)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--chaos-instance", type=int, nargs="*", default=[100, 0],
                        help="chaos: instance steps to try, the first with the SimpleITK baselines")
    parser.add_argument("--instance-lr", type=float, default=0.2)
    parser.add_argument("--bspline", action="store_true", help="chaos: add SimpleITK affine + B-spline (slow)")
    parser.add_argument("--only", default=None, help="real: only pairs whose name contains this text (e.g. MNI152)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "memory-one":
        memory_one(int(args.rest[0]), args.rest[1])
    else:
        {"schedule": schedule, "memory": memory, "real": real, "chaos": chaos, "chaos-io": chaos_io}[args.what](args)


if __name__ == "__main__":
    main()
