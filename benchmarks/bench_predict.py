"""Segmentation `predict` time and peak memory on one 256 x 256 x 40 volume (issue #21: bounded prototype memory).

    .venv/bin/python benchmarks/bench_predict.py [--uncapped]

An untrained 2D prototype run of `configs/segment_decathlon_ssl.yaml` (its architecture; weights do not change
the cost) is adapted on 3 synthetic support scans of 256 x 256 x 40 voxels (every slice holding the structure
becomes a support slice, as in `adapt`), then `predict` segments one more. Each step runs in its own process so
its peak RSS is its own. `--uncapped` sets the prototype cap and the scoring chunk so high that neither binds:
the behaviour before they existed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import pipeline.segmentation.proto as proto
if {uncapped}:
    proto.PROTOTYPE_CAP, proto.SCORE_CHUNK = 10**9, 10**9
    proto.class_scores.__defaults__ = (10**9,)
    proto.cap_prototypes.__defaults__ = (10**9,)
from pipeline.segmentation.adapt import adapt, predict
t = time.perf_counter()
{call}
print(json.dumps({{"seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "out": out}}))
"""


def step(call: str, uncapped: bool) -> dict:
    code = STEP.format(repo=str(REPO), uncapped=uncapped, call=call)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uncapped", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import nibabel as nib
    import numpy as np
    import torch
    import yaml

    from datasets.synth_decathlon import synthetic_case
    from pipeline.common.config import load_config, to_dict
    from pipeline.common.run import save_weights
    from pipeline.segmentation.train import build_model

    work = Path(tempfile.mkdtemp(prefix="fewscan_predict_"))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        image, label = synthetic_case(rng, (256, 256, 40))
        affine = np.diag([1.25, 1.25, 5.0, 1.0])
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(work / f"img{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(work / f"lab{i}.nii.gz"))
        rows.append(f"img{i}.nii.gz,lab{i}.nii.gz")
    (work / "support.csv").write_text("image,label\n" + "\n".join(rows[:3]) + "\n")
    cfg = load_config(REPO / "configs" / "segment_decathlon_ssl.yaml", ["transforms.spacing=null"])
    run = work / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    torch.manual_seed(0)
    save_weights(build_model(cfg), run / "model.safetensors")
    adapted = step(f"s = adapt({str(run)!r}, {str(work / 'support.csv')!r}, {str(work / 'adapted')!r}, '1'); "
                   "out = s['shots']", args.uncapped)
    from safetensors.torch import load_file

    protos = {k: int(v.shape[0]) for k, v in load_file(str(work / "adapted" / "prototypes.safetensors")).items()}
    pred = step(f"rows = predict({str(work / 'adapted')!r}, [{str(work / 'img3.nii.gz')!r}], {str(work / 'p')!r}); "
                "out = rows[0]['voxels']", args.uncapped)
    truth = np.asarray(nib.load(str(work / "lab3.nii.gz")).dataobj) == 1
    mask = np.asarray(nib.load(str(work / "p" / "pred_00.nii.gz")).dataobj) > 0
    dice = 2 * (mask & truth).sum() / max(1, mask.sum() + truth.sum())
    print(json.dumps({"uncapped": args.uncapped, "prototypes": protos, "adapt": adapted, "predict": pred,
                      "dice_untrained_weights": float(dice)}, indent=1))


if __name__ == "__main__":
    main()
