"""`adapt`: fit a trained run to new classes from a few labelled scans; `predict`: per-class probabilities.

    python -m pipeline adapt RUN_DIR_OR_CHECKPOINT --support support.csv --out ADAPTED
    python -m pipeline predict ADAPTED scan1/ scan2.nii.gz ...

Support: a CSV with columns `path` (DICOM series folder, NIfTI, or 2D image; relative to the CSV), `label`, and
optionally the centre columns of the run's config (`data.center_columns`, in `data.center_frame`), or a
class-per-folder tree `DIR/<label>/<item>`. Items get the run's preprocessing: 3D scans the volume preset and a
`roi_size` crop around the centre (the volume centre when none is given); 2D images scaled to [0, 1] and resized
to the training item size.

ADAPTED holds `adapted.json` (classes, method, item shape), `config.yaml`, `model.safetensors` (the meta-trained
weights) and `state.safetensors`: the method's `fit` result (prototypes, adapted weights, a fitted head, ...).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from datasets.volume import FewscanError, InputError, atomic_path
from pipeline.classification.train import build_model
from pipeline.common.config import Config
from pipeline.common.report import write_json
from pipeline.common.run import load_run_config, load_weights, pick_device, read_split, read_tensors

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def resolve_run(path: Path) -> tuple[Path, Path]:
    """(run directory, weights file) from a run directory, a checkpoint folder (`last/`, `best/`) or a weights file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        weights = path
        run = path.parent if (path.parent / "config.yaml").is_file() else path.parent.parent
    elif (path / "config.yaml").is_file():
        run, weights = path, path / "model.safetensors"
    elif (path / "model.safetensors").is_file() and (path.parent / "config.yaml").is_file():
        run, weights = path.parent, path / "model.safetensors"
    else:
        raise InputError(path, "not a run directory, checkpoint folder or .safetensors weights of a run")
    if not weights.is_file() or not (run / "config.yaml").is_file():
        raise InputError(path, "the run has no trained weights (model.safetensors) yet")
    return run, weights


def read_support(spec: Path, cfg: Config, manifest: Path | None = None) -> list[tuple[Path, str, list[float] | None]]:
    """(item path, label, centre or None) rows from a support CSV or a class-per-folder tree.

    CSV columns: the label in `label` or the run's `data.label_column` (e.g. `lesion_type`); the item in `path`
    (relative to the CSV), or, for the collection's own findings CSV, `series_uid`, looked up in `manifest` (the
    run's `manifest.csv`, which `index` wrote); the centre in `data.center_columns` (optional).

    Raises:
        InputError: naming the CSV: unreadable, no label or item column, a series not in the manifest, a
            non-numeric centre, or no rows.
    """
    spec = Path(spec)
    if spec.is_dir():
        rows = [(item, d.name, None) for d in sorted(spec.iterdir()) if d.is_dir() and not d.name.startswith(".")
                for item in sorted(d.iterdir()) if not item.name.startswith(".")]
    else:
        try:
            with spec.open(newline="") as f:
                table = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise InputError(spec, f"cannot read support CSV: {err}") from None
        header = set(table[0]) if table else set()
        label = next((c for c in ("label", cfg.data.label_column) if c in header), None)
        if label is None or not header & {"path", "series_uid"}:
            raise InputError(spec, f"a support CSV needs a label column ('label' or '{cfg.data.label_column}') and "
                             "'path' (or the 'series_uid' of a findings CSV)")
        where = _series_paths(manifest, cfg) if "path" not in header else {}
        rows = [(row_item(row, spec, n, where), row[label], row_centre(row, cfg, spec, n))
                for n, row in enumerate(table, start=2)]
    if not rows:
        raise InputError(spec, "no support items found")
    return rows


def row_item(row: dict[str, str], spec: Path, n: int, where: dict[str, Path]) -> Path:
    """The scan of a support or query CSV row: its `path` (relative to the CSV), else its `series_uid` in `where`.

    Raises:
        InputError: naming the CSV and line `n`, when the series is not in the run's manifest.
    """
    if row.get("path"):
        return (spec.parent / row["path"]).resolve()
    if row.get("series_uid") in where:
        return where[row["series_uid"]]
    raise InputError(spec, f"line {n}: its series is not in the run's manifest.csv; index the new scans "
                     "(python -m pipeline index ROOT --labels THIS.csv --out manifest.csv) and name each scan's "
                     "folder in a 'path' column")


def row_centre(row: dict[str, str], cfg: Config, spec: Path, n: int) -> list[float] | None:
    """The centre of a support or query CSV row (`data.center_columns`), None when any of them is empty.

    Raises:
        InputError: naming the CSV and line `n`, when a centre value is not numeric.
    """
    if not all(row.get(c) not in (None, "") for c in cfg.data.center_columns):
        return None
    try:
        return [float(row[c]) for c in cfg.data.center_columns]
    except ValueError:
        raise InputError(spec, f"line {n}: centre {cfg.data.center_columns} is not numeric") from None


def _series_paths(manifest: Path | None, cfg: Config) -> dict[str, Path]:
    """series_uid -> series path of a manifest CSV (empty without one); a run's manifest names no paths, so its
    series are found again under `data.root`."""
    from datasets.index import locate, read_manifest

    if manifest is None or not Path(manifest).is_file():
        return {}
    rows = [r for r in read_manifest(Path(manifest)) if r.get("series_uid")]
    rows = locate(rows, Path(manifest), Path(cfg.data.root) if cfg.data.root else None)
    return {r["series_uid"]: Path(r["path"]) for r in rows}


def lesion_crops(cfg: Config) -> bool:
    """Whether the run's 3D items are crops around a finding's or structure's centre (`tcia`, `decathlon`), not
    whole scans (`folder`, `npz`): a new scan then needs the lesion's centre."""
    return cfg.data.source in ("tcia", "decathlon")


def check_centre(image: Any, ras: np.ndarray, centre: list[float], cfg: Config, path: Path) -> None:
    """Refuse a centre outside the prepared volume, on any side (a crop there is padding, not the lesion).

    Raises:
        InputError: naming `path`, the centre, its frame and the volume's voxel extent.
    """
    from transforms.presets import world_to_voxel

    vox = world_to_voxel(image, ras)
    shape = np.asarray(image.shape[1:4])
    if np.any(vox < -0.5) or np.any(vox > shape - 0.5):
        raise InputError(path, f"centre {list(centre)} ({cfg.data.center_frame} mm) lies outside the volume "
                         f"(voxel {np.round(vox, 1).tolist()} of a {shape.tolist()} grid)")


def load_item(path: Path, cfg: Config, item_shape: tuple[int, ...], centre: list[float] | None = None,
              whole_volume: bool = False) -> torch.Tensor:
    """One preprocessed item shaped like the training items `item_shape` = `(C, *spatial)`.

    A 3D scan is cropped around `centre` (in `data.center_frame`); without one, a run trained on lesion crops
    refuses it unless `whole_volume` (then the volume's central `roi_size` crop is classified, as for runs
    trained on whole scans).

    Raises:
        InputError: naming `path`: missing, unreadable, a centre outside the volume, no centre for a lesion-crop
            run, or a preprocessed shape other than the model's.
    """
    from datasets.sources import is_nifti, load_image, load_nifti
    from datasets.world import lps_to_ras
    from transforms.crop import fit_size
    from transforms.presets import crop_around, image_2d, prepare, volume_to_dict

    path = Path(path)
    if not path.exists():
        raise InputError(path, "support/input item not found")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        if len(item_shape) != 3:
            raise InputError(path, f"a 2D image, but this model takes items of shape {item_shape}")
        x = image_2d(load_image(path), item_shape[-2:])
    else:
        if path.is_dir():
            from datasets.dicom import load_series

            volume = load_series(path)
        elif is_nifti(path):
            volume = load_nifti(path)
        else:
            raise InputError(path, "expected a DICOM series folder, a NIfTI file or a 2D image")
        image = prepare(cfg.transforms, volume.meta.get("modality"))(volume_to_dict(volume))["image"]
        if centre is not None:
            ras = lps_to_ras(centre) if cfg.data.center_frame == "LPS" else np.asarray(centre)
            check_centre(image, ras, centre, cfg, path)
            x = crop_around(image, ras, cfg.transforms)
        elif lesion_crops(cfg) and not whole_volume:
            raise InputError(path, "this run classifies lesion crops: give the lesion centre (--centre X Y Z in "
                             f"{cfg.data.center_frame} mm, or the columns {cfg.data.center_columns} of a --queries "
                             "CSV), or --whole-volume to classify the volume's central crop")
        else:
            x = fit_size(image, cfg.transforms.roi_size)
        if len(item_shape) == 3 and x.ndim == 4 and cfg.transforms.slice_axis != "none":
            from transforms.presets import SLICE_AXES, central_slice

            x = central_slice(x, SLICE_AXES[cfg.transforms.slice_axis])
    if x.shape[0] != item_shape[0] and x.shape[0] in (1, 3) and item_shape[0] in (1, 3):
        x = x.mean(0, keepdim=True).expand(item_shape[0], *x.shape[1:])  # grey <-> colour
    if tuple(x.shape) != tuple(item_shape):
        raise InputError(path, f"preprocessed to shape {tuple(x.shape)}, but the model takes {tuple(item_shape)}")
    return x.float()


def _model(run: Path, weights: Path) -> tuple[Config, torch.nn.Module, dict[str, Any]]:
    cfg = load_run_config(run)
    split = read_split(run)
    state = json.loads((run / "state.json").read_text()) if (run / "state.json").is_file() else {}
    model = load_weights(build_model(cfg, n_base=len(split["base"])), weights).to(pick_device(cfg.train.device))
    return cfg, model.eval(), {"n_base": len(split["base"]), "item_shape": state.get("item_shape")}


def adapt(run_or_checkpoint: Path, support: Path, out: Path) -> dict[str, Any]:
    """Fit the run's method to the support set's classes; writes the ADAPTED folder and returns its summary."""
    run, weights = resolve_run(run_or_checkpoint)
    cfg, model, info = _model(run, weights)
    if not info["item_shape"]:
        raise InputError(run, "state.json lacks the training item shape; re-run `train` with this version")
    rows = read_support(support, cfg, run / "manifest.csv")
    classes = sorted({label for _, label, _ in rows})
    if len(classes) < 2:
        raise InputError(support, f"the support set needs at least 2 classes, found {classes}")
    if cfg.method.name in ("maml", "metasgd", "reptile") and len(classes) > max(cfg.episodes.ways,
                                                                                 cfg.train.ways or 0):
        raise InputError(support, f"{cfg.method.name} was trained with a {cfg.episodes.ways}-way head; the "
                         f"support set has {len(classes)} classes")
    device = next(model.parameters()).device  # train.device: items are read on the CPU and moved
    x = torch.stack([load_item(p, cfg, tuple(info["item_shape"]), c) for p, _, c in rows]).to(device)
    y = torch.tensor([classes.index(label) for _, label, _ in rows], device=device)
    with torch.no_grad():
        fitted = model.fit(x, y, len(classes))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "config.yaml", out / "config.yaml")
    shutil.copyfile(run / "split.json", out / "split.json")
    with atomic_path(out / "model.safetensors") as tmp:
        shutil.copyfile(weights, tmp)
    with atomic_path(out / "state.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in fitted.items()}, str(tmp))
    summary = {"method": cfg.method.name, "classes": classes, "support_per_class": {c: int((y == i).sum().item())
               for i, c in enumerate(classes)}, "item_shape": info["item_shape"], "run": str(run.resolve())}
    write_json(summary, out / "adapted.json")
    (out / "state.json").write_text(json.dumps({"item_shape": info["item_shape"]}))
    return summary


def read_queries(spec: Path, cfg: Config, manifest: Path | None = None) -> list[tuple[Path, list[float] | None]]:
    """(item path, centre or None) rows of a query CSV: column `path` (relative to the CSV), or the `series_uid` of
    a findings CSV looked up in `manifest` (the run's), and optionally the run's centre columns
    (`data.center_columns`); a support CSV (its label column ignored) is one too.

    Raises:
        InputError: naming the CSV: unreadable, no `path` or `series_uid` column, a series not in the manifest, a
            non-numeric centre, or no rows.
    """
    spec = Path(spec)
    try:
        with spec.open(newline="") as f:
            table = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(spec, f"cannot read the query CSV: {err}") from None
    if not table or not set(table[0]) & {"path", "series_uid"}:
        raise InputError(spec, "a query CSV needs a header with a 'path' column (or the 'series_uid' of a findings "
                         f"CSV) and optionally {cfg.data.center_columns}")
    where = _series_paths(manifest, cfg) if "path" not in table[0] else {}
    return [(row_item(row, spec, n, where), row_centre(row, cfg, spec, n)) for n, row in enumerate(table, start=2)]


def predict(adapted: Path, inputs: list[Path], centre: list[float] | None = None, queries: Path | None = None,
            whole_volume: bool = False) -> list[dict[str, Any]]:
    """Per input: `{"input", "centre", "prediction", "probabilities": {class: p}}` from an ADAPTED folder.

    Inputs are `inputs` (all with `centre`, if given) then the rows of a `queries` CSV (each with its own centre).
    Every input is read and checked before any is classified.
    """
    adapted = Path(adapted)
    if not (adapted / "adapted.json").is_file():
        raise InputError(adapted, "not an adapted folder (no adapted.json); run `adapt` first")
    summary = json.loads((adapted / "adapted.json").read_text())
    cfg, model, _ = _model(adapted, adapted / "model.safetensors")
    rows = [(Path(p), centre) for p in inputs]
    if queries is not None:  # a findings CSV's series_uid rows are found in the run's manifest, as for `adapt`
        rows += read_queries(queries, cfg, Path(summary["run"]) / "manifest.csv")
    if not rows:
        raise FewscanError("no inputs: name scans or give --queries CSV")
    items = [load_item(p, cfg, tuple(summary["item_shape"]), c, whole_volume)[None] for p, c in rows]
    device = next(model.parameters()).device
    fitted = {k: v.to(device) for k, v in read_tensors(adapted / "state.safetensors").items()}
    results = []
    for (path, c), x in zip(rows, items, strict=True):
        with torch.no_grad():
            probs = torch.softmax(model.predict(fitted, x.to(device)).float(), -1)[0].cpu()
        classes = summary["classes"]
        results.append({"input": str(path), "centre": c, "prediction": classes[int(probs.argmax())],
                        "probabilities": {k: float(v) for k, v in zip(classes, probs, strict=True)}})
    return results


def write_predictions(results: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """`OUT/predictions.csv` (input, centre, prediction, one probability column per class) and
    `OUT/predictions.json` (the same records)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = list(results[0]["probabilities"])
    with atomic_path(out / "predictions.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["input", "centre", "prediction", *[f"p_{c}" for c in classes]])
        for r in results:
            centre = " ".join(f"{v:g}" for v in r["centre"]) if r["centre"] is not None else ""
            writer.writerow([r["input"], centre, r["prediction"], *[f"{r['probabilities'][c]:.6f}" for c in classes]])
    write_json(results, out / "predictions.json")
    return out / "predictions.csv", out / "predictions.json"


def format_predictions(results: list[dict[str, Any]]) -> str:
    """One line per input: predicted class, then every class probability."""
    if not results:
        raise FewscanError("no inputs")
    return "\n".join(f"{r['input']}: {r['prediction']}  " + "  ".join(f"{c}={p:.3f}"
                                                                      for c, p in r["probabilities"].items())
                     for r in results)
