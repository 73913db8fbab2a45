"""Segmentation `adapt` and `predict`: fit a trained segmentation run to a new structure from a few labelled
scans (prototypes, or MAML-adapted weights), then segment new images, written as NIfTI and DICOM-SEG.

Adapted folder: `adapted.json` (structure, support files, method), the run's config, and the fitted state.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from datasets.volume import InputError, Volume, atomic_path
from pipeline.common.config import Config
from pipeline.common.report import write_json
from pipeline.common.run import load_run_config, load_weights, pick_device, read_tensors
from pipeline.segmentation.evaluate import axial_slices, foreground_slices, run_learned
from pipeline.segmentation.train import build_model

log = logging.getLogger(__name__)


# --- adapt / predict ----------------------------------------------------------------------------------
def read_seg_support(spec: Path) -> list[tuple[Path, Path]]:
    """`image,label` rows of a support CSV (paths relative to the CSV); image: NIfTI or DICOM series folder,
    label: label-map NIfTI, DICOM-SEG or RTSTRUCT of that image."""

    spec = Path(spec)
    try:
        rows = list(csv.DictReader(spec.read_text().splitlines()))
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(spec, f"cannot read the support CSV ({err})") from None
    if not rows or not {"image", "label"} <= set(rows[0]):
        raise InputError(spec, "a segmentation support CSV needs rows with columns 'image,label'")
    return [(spec.parent / r["image"], spec.parent / r["label"]) for r in rows]


def _load_image(path: Path) -> Volume:
    from datasets.volume_io import load_volume

    return load_volume(Path(path))


def _structure_mask(label: Volume, structure: str | None, where: Path) -> np.ndarray:
    """Binary mask of `structure` (a name from the label table, or a value); any non-zero label when None."""
    arr = np.asarray(label.array)
    arr = arr.any(axis=-1) if arr.ndim == 4 else arr
    if structure is None:
        return arr > 0
    table = label.meta.get("label_names") or {}
    decathlon = Path(where).parent.parent / "dataset.json"  # a Decathlon labelsTr/ file: names in dataset.json
    if not table and decathlon.is_file():
        from datasets.sources import read_label_names

        table = read_label_names(decathlon)
    names = {str(n): int(v) for v, n in table.items()}
    value = names.get(structure, int(structure) if structure.isdigit() else None)
    if value is None:
        raise InputError(where, f"no structure {structure!r} in the labels (names: {sorted(names)})")
    return arr == value


def adapt(run_dir: Path, support: Path, out: Path, structure: str | None = None) -> dict[str, Any]:
    """Fit a trained segmentation run to one structure from K labelled scans; writes the ADAPTED folder.

    Proto: the support prototypes (`prototypes.safetensors`); MAML: the adapted weights (`fast.safetensors`);
    propagate: the prepared support scans and masks (`supports.safetensors`), registered to each query by
    `predict`, and the network's grid (`volume_size` in `adapted.json`).
    """


    from datasets.labels import load_labels
    from pipeline.segmentation.data import make_case
    from pipeline.segmentation.maml import adapt_maml
    from pipeline.segmentation.proto import support_prototypes

    run_dir, out = Path(run_dir), Path(out)
    cfg = load_run_config(run_dir)
    scfg = cfg.segmentation
    images, masks, volumes = [], [], {}
    for n, (image_path, label_path) in enumerate(read_seg_support(support)):
        image = _load_image(image_path)
        label = load_labels(label_path, reference=image_path, image=image, mismatch="resample")
        mask = Volume(_structure_mask(label, structure, label_path).astype(np.uint8), label.affine)
        case = make_case("support", image, mask, {1: "structure"}, cfg.transforms, str(image_path))
        if not case.label.any():
            raise InputError(label_path, f"structure {structure or '(any)'} is empty in this support scan")
        m = case.label > 0
        volumes.update({f"image_{n}": torch.from_numpy(case.image), f"mask_{n}": torch.from_numpy(m)})
        if scfg.mode == "2d":
            images.append(axial_slices(case.image, foreground_slices(m)))
            masks.append(axial_slices(m.astype(np.float32), foreground_slices(m)))
        else:
            images.append(torch.from_numpy(case.image)[None, None])
            masks.append(torch.from_numpy(m.astype(np.float32))[None, None])
    extra: dict[str, Any] = {}
    if scfg.method == "propagate":  # the supports themselves: each query is registered to them at predict time
        state, name = volumes, "supports.safetensors"
        extra["volume_size"] = json.loads((run_dir / "state.json").read_text())["volume_size"]
    else:  # on train.device; what is saved comes back to the CPU
        device = pick_device(cfg.train.device)
        model = load_weights(build_model(cfg), run_dir / "model.safetensors").to(device).eval()
        images, masks = [x.to(device) for x in images], [m.to(device) for m in masks]
        if scfg.method == "proto":
            with torch.no_grad():
                bg, fg = support_prototypes(model, images, masks, tuple(scfg.crop) if scfg.mode == "3d" else None)
            state, name = {"bg": bg, "fg": fg}, "prototypes.safetensors"
        else:
            state, name = adapt_maml(model, scfg, images, masks, cfg.seed), "fast.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "config.yaml", out / "config.yaml")
    with atomic_path(out / "model.safetensors") as tmp:
        shutil.copyfile(run_dir / "model.safetensors", tmp)
    with atomic_path(out / name) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    summary = {"task": "segmentation", "method": scfg.method, "mode": scfg.mode, "structure": structure or "mask",
               "shots": len(images), **extra}
    write_json(summary, out / "adapted.json")
    return summary


def predict(adapted: Path, inputs: list[Path], out: Path) -> list[dict[str, Any]]:
    """Segment each input scan; writes `pred_NN.nii.gz` in the input's own geometry and, for a DICOM series
    input, `pred_NN_seg.dcm` (DICOM-SEG referencing that series)."""


    from pipeline.segmentation.data import make_case
    from pipeline.segmentation.maml import maml_predictor
    from pipeline.segmentation.output import write_prediction
    from pipeline.segmentation.proto import proto_predictor

    adapted, out = Path(adapted), Path(out)
    info = json.loads((adapted / "adapted.json").read_text())
    cfg = load_run_config(adapted)
    scfg = cfg.segmentation
    roi = tuple(scfg.crop) if scfg.mode == "3d" else None
    device = pick_device(cfg.train.device)
    if scfg.method == "propagate":
        predictor = _propagator(cfg, adapted, info)
    else:
        model = load_weights(build_model(cfg), adapted / "model.safetensors").to(device).eval()
        state = {k: v.to(device) for k, v in read_tensors(adapted / (
            "prototypes.safetensors" if scfg.method == "proto" else "fast.safetensors")).items()}
        predictor = (proto_predictor(model, state["bg"], state["fg"], roi) if scfg.method == "proto" else
                     maml_predictor(model, scfg, state))
    results = []
    for i, path in enumerate(inputs):
        path = Path(path)
        image = _load_image(path)
        case = make_case(f"input{i}", image, None, {}, cfg.transforms, str(path))
        mask = (predictor(case.image) if scfg.method == "propagate" else
                run_learned(lambda xs, ms: predictor, scfg.mode, [], case.image, None, 1, True, device))
        row = write_prediction(mask, case.affine, path, image, out / f"pred_{i:02d}", info["structure"],
                               scfg.codes)
        results.append(row)
    return results


def _propagator(cfg: Config, adapted: Path, info: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """`query image (I, J, K) -> bool mask`: the adapted folder's supports propagated onto the query."""
    from pipeline.segmentation.propagate import build_net, propagate

    grid = tuple(int(v) for v in info["volume_size"])
    net = load_weights(build_net(cfg, grid), adapted / "model.safetensors").to(pick_device(cfg.train.device)).eval()
    stored = read_tensors(adapted / "supports.safetensors")
    supports = [(stored[f"image_{n}"].numpy(), stored[f"mask_{n}"].numpy()) for n in range(info["shots"])]
    return lambda image: propagate(net, cfg.registration, supports, image, grid, cfg.segmentation.fusion == "local")
