"""The `register` verb: warp a moving image (and labels) onto a fixed one with a registration run; ITK field out."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.sources import load_label_map
from datasets.volume import FewscanError, InputError, Volume
from pipeline.common.config import Config
from pipeline.common.report import write_json
from pipeline.common.run import load_run_config, load_weights, pick_device
from pipeline.registration.episodes import NO_FOREGROUND, labels_on_image, preprocess
from pipeline.registration.network import (
    Losses,
    RegistrationNet,
    model_device,
    predict,
    refine,
)
from pipeline.registration.train import build_net


# --- the run ----------------------------------------------------------------------------------------------------
def load_checkpoint(checkpoint: Path) -> tuple[Config, RegistrationNet, dict[str, Any]]:
    """Config, network with trained weights and `state.json` of a run directory (or its `.safetensors` file)."""
    import json

    path = Path(checkpoint)
    run_dir = path if path.is_dir() else path.parent
    weights = path if path.is_file() else run_dir / "model.safetensors"
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "state.json").is_file() or not weights.is_file():
        raise InputError(path, "not a registration run (needs config.yaml, state.json and model.safetensors)")
    cfg = load_run_config(run_dir)
    if cfg.task != "registration":
        raise InputError(path, f"a {cfg.task} run, not a registration run")
    state = json.loads((run_dir / "state.json").read_text())
    model = load_weights(build_net(cfg, tuple(state["volume_size"])), weights).to(pick_device(cfg.train.device))
    pairs = json.loads((run_dir / "pairs.json").read_text()) if (run_dir / "pairs.json").is_file() else {}
    state["modality"] = next((p["modality"] for p in pairs.get("train", [])), "")
    return cfg, model, state


def predict_transform(cfg: Config, model: RegistrationNet, fixed: Volume, moving: Volume, modality: str,
                      moving_modality: str | None = None,
                      fixed_path: Path | None = None) -> tuple[np.ndarray, Volume, Volume, Any]:
    """Register `moving` to `fixed` (any grids) with a trained network.

    Both are prepared by the run's preset (`modality` is the preset key of both, or of the fixed image when
    `moving_modality` is given); the fixed one defines the network grid, the moving one is resampled onto it after
    aligning the centres of the two prepared grids (SimpleITK `CenteredTransformInitializer`, GEOMETRY), or after a
    SimpleITK affine (itself centre-initialised) when `prealign: sitk`. Two scans of different patients (or
    sessions) rarely share a world origin; centring is what `evaluate` does too, where each prepared volume is
    taken voxel for voxel on the common grid, so both score the same pair the same way.

    Returns:
        The network's DDF `(3, *grid)` (voxels of the grid), the prepared fixed volume (the grid), the prepared
        moving volume on the grid (before the DDF), and the total fixed->moving SimpleITK transform.

    Raises:
        InputError: naming `fixed_path`, when the prepared fixed image is not the network's grid (a run trained
            without `transforms.volume_size`); or when, centred, the moving image covers under
            `MIN_OVERLAP` of the fixed grid (fields of view that cannot overlap).
    """
    import SimpleITK as sitk

    from datasets.world import to_sitk
    from pipeline.registration.classical import register_sitk
    from pipeline.registration.deformation import ddf_to_itk, resample_to

    grid, _ = preprocess(cfg, fixed, None, 0, modality)
    if grid.array.shape != model.image_size:
        raise InputError(fixed_path or "fixed image", f"prepared, it is {list(grid.array.shape)} voxels but the "
                         f"network was trained on {list(model.image_size)}: train with transforms.volume_size set")
    moving_p, _ = preprocess(cfg, moving, None, 0, moving_modality or modality)
    if cfg.registration.prealign == "sitk":
        affine = register_sitk(grid, moving_p, "affine", seed=cfg.seed)[1]
    else:
        affine = sitk.CenteredTransformInitializer(to_sitk(grid), to_sitk(moving_p), sitk.Euler3DTransform(),
                                                   sitk.CenteredTransformInitializerFilter.GEOMETRY)
    # the moving scan's own field of view (its prepared volume may be zero-padded to the grid size)
    cover = resample_to(Volume(np.ones(moving.array.shape[:3], np.float32), moving.affine), grid, True, affine)
    if cover.array.mean() < MIN_OVERLAP:
        raise InputError(fixed_path or "fixed image", f"the moving image covers {cover.array.mean():.1%} of its "
                         "grid after aligning their centres: their fields of view cannot overlap enough to register")
    on_grid = resample_to(moving_p, grid, transform=affine)
    to_tensor = lambda v: torch.from_numpy(np.asarray(v.array, np.float32))[None, None]  # noqa: E731
    moving_t, fixed_t = to_tensor(on_grid), to_tensor(grid)
    rcfg = cfg.registration  # instance optimisation of this pair's field, as `evaluate` scores it
    ddf = refine(predict(model, moving_t, fixed_t), moving_t, fixed_t, Losses(rcfg, 1), rcfg.instance_steps,
                 rcfg.instance_lr, model_device(model))[0].numpy()
    field = sitk.DisplacementFieldTransform(ddf_to_itk(ddf, grid))
    return ddf, grid, on_grid, sitk.CompositeTransform([affine, field])


MIN_OVERLAP = 0.1  # share of the fixed grid the centred moving image must cover


# --- input checks ------------------------------------------------------------------------------------------------
MONO_MODAL = ("lncc",)  # similarities comparing intensities directly: both images must show one modality
# DICOM's Modality tag names only the family (`MR`); dataset.json files and users also name MR contrasts
MR_NAMES = ("MR", "T1", "T2", "FLAIR", "ADC", "DWI", "PD")


def modalities_differ(a: str, b: str) -> bool:
    """Whether two known modality names surely differ: `MRI` is `MR`, the bare family `MR` matches any MR
    contrast (`T2`, `ADC`...), and two different contrasts differ (T2 and ADC images are not mono-modal)."""
    a, b = ("MR" if n.strip().upper() == "MRI" else n.strip().upper() for n in (a, b))
    if a == b:
        return False
    return "MR" not in (a, b) or not (a.startswith(MR_NAMES) and b.startswith(MR_NAMES))


def image_modalities(given: str | Sequence[str] | None, fixed: Volume,
                     moving: Volume) -> tuple[str | None, str | None]:
    """The modality of each image: `--modality` (once: both images; twice: fixed, then moving), else the file's
    own (DICOM Modality), else None (unknown: a NIfTI file says nothing, and nothing is guessed).

    Raises:
        FewscanError: `--modality` given more than twice.
    """
    items = [given] if isinstance(given, str) else list(given or [])
    if len(items) > 2:
        raise FewscanError(f"--modality given {len(items)} times: give it once (both images) or twice (fixed, "
                           "then moving)")
    items = (items * 2 if len(items) == 1 else items) or [None, None]
    own = [v.meta.get("modality") or None for v in (fixed, moving)]
    return items[0] or own[0], items[1] or own[1]


def check_modalities(similarity: str, paths: tuple[Path, Path], modalities: tuple[str | None, str | None]) -> None:
    """Refuse two images of known, different modalities for a run trained with a mono-modal similarity.

    Raises:
        FewscanError: naming both files and modalities.
    """
    (fixed_path, moving_path), (fm, mm) = paths, modalities
    if similarity in MONO_MODAL and fm and mm and modalities_differ(fm, mm):
        raise FewscanError(f"{fixed_path} is {fm} but {moving_path} is {mm}: this run was trained with a mono-modal "
                           f"similarity ({similarity}); register different modalities with a run trained with "
                           "registration.similarity: mi")


def load_image(path: Path) -> Volume:
    """A fixed or moving image, refused unless 3D with at least 2 voxels along every axis (a single slice has no
    neighbours for the field's Jacobian, and nothing to register in 3D)."""
    from datasets.volume_io import load_volume

    vol = load_volume(Path(path))
    if vol.array.ndim != 3 or min(vol.array.shape) < 2:
        raise InputError(path, f"expected a 3D image with at least 2 voxels along every axis, got shape "
                         f"{vol.array.shape}")
    return vol


def load_moving_labels(path: Path, moving: Volume, moving_path: Path) -> Volume:
    """The moving image's label map, refused when all background or off the moving image (`labels_on_image`)."""
    labels = load_label_map(Path(path))
    if not labels.array.any():
        raise InputError(path, NO_FOREGROUND)
    labels_on_image(labels, moving, Path(path), Path(moving_path))
    return labels


# --- register files (CLI) --------------------------------------------------------------------------------------
def register_files(fixed_path: Path, moving_path: Path, labels_path: Path | None, checkpoint: Path,
                   out_dir: Path, modality: str | Sequence[str] | None = None) -> dict[str, Any]:
    """`python -m pipeline register`: write `warped.nii.gz`, `warped_labels.nii.gz` (with labels),
    `displacement.nii.gz` (ITK displacement field on the fixed grid, LPS mm) and `register.json` to `out_dir`.

    Every input is checked before anything is written (`load_image`, `load_moving_labels`, `check_modalities`).
    The warped outputs are produced by SimpleITK from exactly the field written, so
    `sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field))` reproduces them.

    Args:
        modality: `--modality`: the intensity preset key of both images, or one per image (fixed, moving);
            default: each image's own (DICOM), else the run's.
    """
    import SimpleITK as sitk

    from datasets.volume_io import write_nifti
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
    fixed, moving = load_image(fixed_path), load_image(moving_path)
    labels = load_moving_labels(labels_path, moving, moving_path) if labels_path is not None else None
    known = image_modalities(modality, fixed, moving)
    check_modalities(cfg.registration.similarity, (fixed_path, moving_path), known)
    keys = [m or state["modality"] for m in known]
    _, _, _, transform = predict_transform(cfg, model, fixed, moving, keys[0], keys[1], fixed_path)
    ddf = transform_to_ddf(transform, fixed)  # on the fixed image's own grid
    written = sitk.DisplacementFieldTransform(ddf_to_itk(ddf, fixed))
    outputs = {"warped": resample_to(moving, fixed, transform=written)}
    if labels is not None:
        outputs["warped_labels"] = resample_to(labels, fixed, nearest=True, transform=written)
    jac = jacobian_determinant(ddf)
    summary = {"folding": folding_ratio(jac), "log_jac_std": log_jacobian_std(jac),
               "outputs": sorted([*outputs, "displacement"]),
               "field": "ITK displacement field, LPS mm, fixed grid: sitk.DisplacementFieldTransform"}
    out_dir = Path(out_dir)  # written only now: every check and computation above can refuse
    out_dir.mkdir(parents=True, exist_ok=True)
    write_displacement_field(ddf, fixed, out_dir / "displacement.nii.gz")
    for name, vol in outputs.items():
        write_nifti(vol, out_dir / f"{name}.nii.gz")
    summary = {"seconds": time.perf_counter() - start, **summary}
    write_json(summary, out_dir / "register.json")
    return summary
