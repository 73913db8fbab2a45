"""The `register` verb: warp a moving image (and labels) onto a fixed one with a registration run; ITK field out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.sources import load_label_map
from datasets.volume import FewscanError, Volume
from pipeline.common.config import Config
from pipeline.common.report import write_json
from pipeline.common.run import load_run_config, load_weights
from pipeline.registration.episodes import (
    preprocess,
)
from pipeline.registration.network import (
    RegistrationNet,
    predict,
)
from pipeline.registration.train import build_net


# --- register files (CLI) --------------------------------------------------------------------------------------
def load_checkpoint(checkpoint: Path) -> tuple[Config, RegistrationNet, dict[str, Any]]:
    """Config, network with trained weights and `state.json` of a run directory (or its `.safetensors` file)."""
    import json

    from datasets.volume import InputError

    path = Path(checkpoint)
    run_dir = path if path.is_dir() else path.parent
    weights = path if path.is_file() else run_dir / "model.safetensors"
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "state.json").is_file() or not weights.is_file():
        raise InputError(path, "not a registration run (needs config.yaml, state.json and model.safetensors)")
    cfg = load_run_config(run_dir)
    if cfg.task != "registration":
        raise InputError(path, f"a {cfg.task} run, not a registration run")
    state = json.loads((run_dir / "state.json").read_text())
    model = load_weights(build_net(cfg, tuple(state["volume_size"])), weights)
    pairs = json.loads((run_dir / "pairs.json").read_text()) if (run_dir / "pairs.json").is_file() else {}
    state["modality"] = next((p["modality"] for p in pairs.get("train", [])), "")
    return cfg, model, state


def predict_transform(cfg: Config, model: RegistrationNet, fixed: Volume, moving: Volume,
                      modality: str) -> tuple[np.ndarray, Volume, Volume, Any]:
    """Register `moving` to `fixed` (any grids) with a trained network.

    Both are prepared by the run's preset; the fixed one defines the network grid, the moving one is resampled
    onto it in world coordinates (after a SimpleITK affine when `prealign: sitk`).

    Returns:
        The network's DDF `(3, *grid)` (voxels of the grid), the prepared fixed volume (the grid), the prepared
        moving volume on the grid (before the DDF), and the total fixed->moving SimpleITK transform.
    """
    import SimpleITK as sitk

    from pipeline.registration.classical import register_sitk
    from pipeline.registration.deformation import ddf_to_itk, resample_to

    grid, _ = preprocess(cfg, fixed, None, 0, modality)
    if grid.array.shape != model.image_size:
        raise FewscanError(f"the prepared fixed image is {list(grid.array.shape)} voxels but the network was trained "
                           f"on {list(model.image_size)}: train with transforms.volume_size set")
    moving_p, _ = preprocess(cfg, moving, None, 0, modality)
    affine = register_sitk(grid, moving_p, "affine", seed=cfg.seed)[1] if cfg.registration.prealign == "sitk" else None
    on_grid = resample_to(moving_p, grid, transform=affine)
    to_tensor = lambda v: torch.from_numpy(np.asarray(v.array, np.float32))[None, None]  # noqa: E731
    ddf = predict(model, to_tensor(on_grid), to_tensor(grid))[0].numpy()
    field = sitk.DisplacementFieldTransform(ddf_to_itk(ddf, grid))
    return ddf, grid, on_grid, field if affine is None else sitk.CompositeTransform([affine, field])


def register_files(fixed_path: Path, moving_path: Path, labels_path: Path | None, checkpoint: Path,
                   out_dir: Path, modality: str | None = None) -> dict[str, Any]:
    """`python -m pipeline register`: write `warped.nii.gz`, `warped_labels.nii.gz` (with labels),
    `displacement.nii.gz` (ITK displacement field on the fixed grid, LPS mm) and `register.json` to `out_dir`.

    The warped outputs are produced by SimpleITK from exactly the field written, so
    `sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field))` reproduces them.
    """
    import SimpleITK as sitk

    from datasets.volume import InputError
    from datasets.volume_io import load_volume, write_nifti
    from pipeline.registration.deformation import (
        ddf_to_itk,
        folding_ratio,
        jacobian_determinant,
        log_jacobian_std,
        resample_to,
        transform_to_ddf,
        write_displacement_field,
    )

    start = time.perf_counter()
    cfg, model, state = load_checkpoint(checkpoint)
    fixed, moving = load_volume(Path(fixed_path)), load_volume(Path(moving_path))
    for path, vol in ((fixed_path, fixed), (moving_path, moving)):
        if vol.array.ndim != 3:
            raise InputError(path, f"expected a 3D image, got shape {vol.array.shape}")
    labels = load_label_map(Path(labels_path)) if labels_path is not None else None
    _, _, _, transform = predict_transform(cfg, model, fixed, moving, modality or state["modality"])
    ddf = transform_to_ddf(transform, fixed)  # on the fixed image's own grid
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_displacement_field(ddf, fixed, out_dir / "displacement.nii.gz")
    written = sitk.DisplacementFieldTransform(ddf_to_itk(ddf, fixed))
    outputs = {"warped": resample_to(moving, fixed, transform=written)}
    if labels is not None:
        outputs["warped_labels"] = resample_to(labels, fixed, nearest=True, transform=written)
    for name, vol in outputs.items():
        write_nifti(vol, out_dir / f"{name}.nii.gz")
    jac = jacobian_determinant(ddf)
    summary = {"seconds": time.perf_counter() - start, "folding": folding_ratio(jac),
               "log_jac_std": log_jacobian_std(jac), "outputs": sorted([*outputs, "displacement"]),
               "field": "ITK displacement field, LPS mm, fixed grid: sitk.DisplacementFieldTransform"}
    write_json(summary, out_dir / "register.json")
    return summary


