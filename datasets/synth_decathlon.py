"""Seeded synthetic Decathlon-format folders of small MR-like volumes, for tests and benchmarks.

Two generators, because the tasks need different images:
- `write_synthetic_organs` (segmentation): abdominal-like crops with three labelled organs (liver, kidney, spleen)
  of jittered size and place, plus unlabelled distractor blobs.
- `write_synthetic_subjects` (registration): one template (an ellipsoid core and shell) moved per subject by a
  random affine and a smooth displacement, so inter-subject registration has a known answer up to noise.
Both write through `write_decathlon`. The same arguments give byte-identical folders.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

SYNTH_STRUCTURES = {1: "liver", 2: "kidney", 3: "spleen"}


def write_decathlon(root: Path, cases: Iterable[tuple[np.ndarray, np.ndarray | None]], affine: np.ndarray,
                    name: str, modality: str, labels: dict[int, str], test_section: bool) -> Path:
    """Write a Decathlon-format folder of `synth_000.nii.gz`, `synth_001.nii.gz`, ... (in the order of `cases`).

    Args:
        cases: `(image, label)` arrays `(I, J, K)`; a case with a label goes to `imagesTr/` + `labelsTr/` and the
            `training` list, one without to `imagesTs/` and the `test` list.
        labels: label value -> structure name (background is added).
        test_section: write `imagesTs/` and `numTest` even when empty (the segmentation folder always had them).

    Returns:
        `root`, holding `dataset.json`, `imagesTr/`, `labelsTr/` and (with `test_section`) `imagesTs/`.

    Files get nibabel's default header rather than `datasets.volume_io.write_nifti`'s (scanner codes, units): the
    folders stay byte-identical to those the tests and benchmark figures were made with.
    """
    root = Path(root)
    for folder in ("imagesTr", "labelsTr", *(("imagesTs",) if test_section else ())):
        (root / folder).mkdir(parents=True, exist_ok=True)
    training, test = [], []
    for i, (image, label) in enumerate(cases):
        file = f"synth_{i:03d}.nii.gz"
        folder = "imagesTr" if label is not None else "imagesTs"
        nib.save(nib.Nifti1Image(image, affine), str(root / folder / file))
        if label is not None:
            nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / file))
            training.append({"image": f"./imagesTr/{file}", "label": f"./labelsTr/{file}"})
        else:
            test.append(f"./imagesTs/{file}")
    spec: dict = {"name": name, "modality": {"0": modality},
                  "labels": {"0": "background", **{str(k): v for k, v in labels.items()}},
                  "numTraining": len(training)}
    if test_section:
        spec["numTest"] = len(test)
    spec.update(training=training, test=test)
    (root / "dataset.json").write_text(json.dumps(spec, indent=2))
    return root


# --- segmentation: organs ----------------------------------------------------------------------------------
def _ellipsoid(shape: tuple[int, ...], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return (((grid - centre) / radii) ** 2).sum(-1) <= 1.0


def synthetic_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One MR-like crop `(I, J, K)` (float32, arbitrary units) and its label map (0 bg, 1 liver, 2 kidney, 3 spleen).

    A body ellipsoid with a smooth bias field and noise, three organ ellipsoids with organ-specific intensity and
    jittered size/position, plus two unlabelled distractor blobs.
    """
    s = np.asarray(shape, float)
    image = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    body = _ellipsoid(shape, s / 2, s * np.array([0.47, 0.45, 0.6]))
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    bias = 1.0 + 0.15 * (grid @ rng.normal(0, 1, 3))
    image[body] = 300.0
    organs = [(1, [0.35, 0.45, 0.5], [0.2, 0.2, 0.25], 700.0), (2, [0.65, 0.6, 0.45], [0.1, 0.12, 0.15], 500.0),
              (3, [0.68, 0.35, 0.55], [0.12, 0.12, 0.15], 900.0)]
    for value, centre, radii, intensity in organs:
        c = s * (np.asarray(centre) + rng.uniform(-0.05, 0.05, 3))
        r = s * np.asarray(radii) * rng.uniform(0.8, 1.2, 3)
        m = _ellipsoid(shape, c, r) & body
        image[m] = intensity * rng.uniform(0.9, 1.1)
        label[m] = value
    for _ in range(2):  # unlabelled distractors: pseudo-structures the SSL must not rely on labels for
        m = _ellipsoid(shape, s * rng.uniform(0.25, 0.75, 3), s * rng.uniform(0.05, 0.1, 3)) & body & (label == 0)
        image[m] = rng.uniform(400, 1000)
    image = image * bias + rng.normal(0, 20, shape)
    return np.clip(image, 0, None).astype(np.float32), label


def write_synthetic_organs(root: Path, n_cases: int = 12, shape: tuple[int, int, int] = (40, 50, 40),
                           seed: int = 0, spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
                           unlabelled: int = 0) -> Path:
    """A folder `SynthMR` of `n_cases` labelled `synthetic_case` crops, then `unlabelled` ones in `imagesTs/`."""
    rng = np.random.default_rng(seed)

    def cases() -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        for i in range(n_cases + unlabelled):
            image, label = synthetic_case(rng, shape)  # drawn for unlabelled cases too: the same stream either way
            yield image, (label if i < n_cases else None)

    return write_decathlon(root, cases(), np.diag([*spacing, 1.0]), "SynthMR", "MRI", SYNTH_STRUCTURES,
                           test_section=True)


# --- registration: deformed subjects of one template --------------------------------------------------------
def write_synthetic_subjects(root: Path, n_cases: int = 12, shape: tuple[int, int, int] = (40, 50, 40),
                             seed: int = 0, name: str = "SynthBrain", modality: str = "MRI") -> Path:
    """A folder of `n_cases` MR-like volumes with two labelled structures (1 core, 2 shell), 1.5 mm.

    Each subject is one template (a bright ellipsoid with a darker core, on a textured background) moved by a
    random small affine and a smooth random displacement, with a smooth bias field and noise; labels follow the
    same deformation. Images float32, labels uint8, all in `imagesTr/` + `labelsTr/`.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.arange(s, dtype=float) for s in shape), indexing="ij"))
    centre = (np.asarray(shape, float) - 1) / 2
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 3.0)

    def cases() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for _ in range(n_cases):
            # subject-specific map: small affine + smooth displacement (voxels)
            mat = np.eye(3) + rng.normal(scale=0.06, size=(3, 3))
            shift = rng.normal(scale=2.0, size=3)
            smooth = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 6.0) for _ in range(3)])
            smooth *= 3.0 / max(np.abs(smooth).max(), 1e-6)
            coords = np.einsum("ab,b...->a...", mat, grid - centre[:, None, None, None]) + centre[:, None, None, None]
            coords += shift[:, None, None, None] + smooth
            rel = (coords - centre[:, None, None, None]) / (np.asarray(shape, float)[:, None, None, None] * 0.3)
            radius = np.sqrt((rel**2).sum(0))
            label = np.where(radius < 0.55, 1, np.where(radius < 1.0, 2, 0)).astype(np.uint8)
            tex = ndimage.map_coordinates(texture, coords, order=1, mode="nearest")
            image = np.choose(label, [0.2, 0.9, 0.6]) + 0.15 * tex
            bias = 1.0 + 0.1 * ndimage.gaussian_filter(rng.normal(size=shape), 10.0) / 0.05
            image = (image * bias + rng.normal(scale=0.03, size=shape)) * 800.0
            yield image.astype(np.float32), label

    return write_decathlon(root, cases(), np.diag([1.5, 1.5, 1.5, 1.0]), name, modality, {1: "core", 2: "shell"},
                           test_section=False)
