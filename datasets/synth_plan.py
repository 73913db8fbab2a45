"""Random part of the synthetic cohort (see `datasets.synth`): lesion types, per-patient plans, rare-type
assignment. A plan is a plain record; rendering it (`datasets.synth.render_patient`) draws nothing at random.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid
from scipy.spatial.transform import Rotation

from datasets.volume import FewscanError
from datasets.world import LPS_TO_RAS

COMMON_TYPES = ("cyst", "solid_nodule", "calcified_granuloma", "hemangioma", "metastasis")
RARE_TYPES = ("spiculated_mass", "cavitary_lesion", "ground_glass_nodule")
DEFAULT_PATIENTS = 60
RARE_SHARE = 0.25  # share of patients that hold one lesion of a given rare type: 15 of 60 per type
LABEL_NAMES = {1: "body", 2: "lung_right", 3: "lung_left", 4: "liver", 5: "spine", 6: "ribs", 7: "lesion"}
BODY, LUNG_R, LUNG_L, LIVER, SPINE, RIBS, LESION = range(1, 8)
ORGANS = {"cyst": (LIVER,), "hemangioma": (LIVER,), "metastasis": (LIVER, LUNG_R, LUNG_L)}  # others: lungs
FINDINGS_COLUMNS = ["patient_id", "study_uid", "series_uid", "lesion_id", "lesion_type", "lps_x", "lps_y", "lps_z"]
_FIRST_DATE = datetime.date(2001, 1, 1)


@dataclass(frozen=True)
class Lesion:
    """One planned lesion: world centre (LPS mm), core radius, orientation and type-specific parameters."""

    lesion_id: str
    lesion_type: str
    organ: int
    centre: tuple[float, float, float]
    radius: float
    extent: float  # radius of the sphere holding all of it (spicules included)
    rotation: tuple[float, ...]  # 3x3 row-major; columns are the lesion axes in LPS
    params: dict[str, float]
    seed: int  # shape details (lobes, spicules, texture) derive from it at render time


@dataclass(frozen=True)
class Anatomy:
    """Torso phantom: an elliptic body with its axis at ``centre`` and the diaphragm level ``diaphragm_z``."""

    centre: tuple[float, float]
    diaphragm_z: float
    half_width: float
    half_depth: float
    fat_mm: float
    dome_mm: float
    rib_phase: float
    disc_phase: float
    tissue_hu: dict[str, float]  # liver as in a portal-venous contrast phase, so liver lesions show
    bias: tuple[float, ...]  # low-frequency intensity variation (HU per normalised coordinate)


@dataclass(frozen=True)
class PatientPlan:
    """Every random choice for one patient; ``render_patient`` turns it into voxels."""

    index: int
    patient_id: str
    seed: int
    uid_key: tuple[str, ...]
    study_date: str
    shape: tuple[int, int, int]  # (slices, rows, columns)
    pixel_mm: float
    slice_mm: float
    origin: tuple[float, float, float]  # LPS of voxel (0, 0, 0): IPP of the most inferior slice
    file_order: tuple[int, ...]  # on-disk file number of slice k
    anatomy: Anatomy
    lesions: tuple[Lesion, ...]

    def uid(self, *parts: object) -> str:
        """A valid DICOM UID derived from the cohort seed, the patient and ``parts`` only (deterministic)."""
        return str(generate_uid(entropy_srcs=[*self.uid_key, *map(str, parts)]))

    @property
    def affine_lps(self) -> np.ndarray:
        """``(4, 4)`` voxel index ``(c, r, k)`` -> LPS mm."""
        aff = np.diag([self.pixel_mm, self.pixel_mm, self.slice_mm, 1.0])
        aff[:3, 3] = self.origin
        return aff

    @property
    def affine_ras(self) -> np.ndarray:
        """``(4, 4)`` voxel index ``(c, r, k)`` -> RAS+ mm (the NIfTI affine of the label map)."""
        return LPS_TO_RAS @ self.affine_lps


@dataclass
class SynthSummary:
    """What ``write_cohort`` wrote."""

    out_dir: Path
    seed: int
    patients: int
    series: int
    files: int
    lesions: dict[str, int] = field(default_factory=dict)
    patients_per_type: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"synthetic cohort (seed {self.seed}): {self.patients} patients, {self.series} CT series, "
                 f"{self.files} DICOM files -> {self.out_dir}", "  lesion type            lesions  patients"]
        for t in COMMON_TYPES + RARE_TYPES:
            kind = "rare" if t in RARE_TYPES else "common"
            lines.append(f"  {t:<22}{self.lesions.get(t, 0):>8}{self.patients_per_type.get(t, 0):>10}  {kind}")
        return "\n".join(lines)


# --- planning --------------------------------------------------------------------------------------------
def _lesion_params(rng: np.random.Generator, kind: str) -> tuple[float, float, dict[str, float]]:
    """Core radius (mm), extent (mm) and parameters of one lesion. Ranges overlap across types on purpose."""
    u = rng.uniform
    p = {"axis1": u(0.7, 1.0), "axis2": u(0.7, 1.0), "lobes": u(0.0, 0.08), "edge": 0.6, "texture": u(4, 12)}
    if kind == "cyst":
        r = u(3, 8)
        p |= {"value": u(-5, 20), "texture": 2.0}
    elif kind == "solid_nodule":
        r = u(3, 7)
        p |= {"value": u(-20, 60)}
    elif kind == "calcified_granuloma":
        r = u(2.5, 5)
        p |= {"value": u(20, 60), "calc_value": u(250, 900), "calc_frac": u(0.4, 1.0)}
    elif kind == "hemangioma":
        r = u(5, 9)
        p |= {"value": u(40, 60), "nodule_value": u(150, 220), "nodules": float(rng.integers(4, 9)),
              "lobes": u(0.05, 0.15)}
    elif kind == "metastasis":
        r = u(3.5, 9)
        p |= {"value": u(0, 35), "rim_value": u(50, 90), "rim_mm": u(1.5, 3.0), "lobes": u(0.08, 0.2)}
    elif kind in RARE_TYPES:  # same size range; solid vs ground-glass density as in radiology, overlapping
        r = u(4.5, 8.5)
        # Spiculated and cavitary share the solid range (morphology tells them apart); ground glass is hazy
        # (-700..-350 HU), the radiological definition, so density learnt on common types transfers.
        solid = kind != "ground_glass_nodule"
        p |= {"value": u(-150, 60) if solid else u(-700, -350), "texture": u(5, 25)}
        # Air shows in all three (bronchogram, cavity, bubbles), so a dark centre alone does not name the type.
        p["air"] = u(-980, -900)
        if kind == "spiculated_mass":  # sometimes an air bronchogram: a thin air tube across the core
            p |= {"lobes": u(0.1, 0.2), "spicules": float(rng.integers(8, 17)), "spicule_len": u(0.8, 1.6),
                  "bronchus": u(0.5, 0.9) if rng.random() < 0.5 else 0.0}
        elif kind == "cavitary_lesion":
            p |= {"lobes": u(0.03, 0.12), "cavity_frac": u(0.35, 0.65), "cavity_shift": u(0.5, 1.0)}
        else:  # ground glass: soft edge, mottled, often with small air bubbles (pseudocavitation)
            p |= {"edge": u(1.5, 3.0), "texture": u(40, 90), "bubbles": float(rng.integers(0, 5))}
    else:
        raise ValueError(f"unknown lesion type {kind!r}")
    extent = r * (1 + 2 * p["lobes"]) + p["edge"] + r * 1.4 * p.get("spicule_len", 0.0)
    return r, extent, p


def anatomy_labels(an: Anatomy, bx: np.ndarray, by: np.ndarray, bz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label map and fat mask of the phantom at body-frame points (mm from body axis / diaphragm; broadcast)."""
    a, b, f = an.half_width, an.half_depth, an.fat_mm
    shape = np.broadcast_shapes(bx.shape, by.shape, bz.shape)
    body = (bx / a) ** 2 + (by / b) ** 2 <= 1
    inner = (bx / (a - f)) ** 2 + (by / (b - f)) ** 2 <= 1
    labels = np.where(body, BODY, 0).astype(np.uint8)
    labels = np.broadcast_to(labels, shape).copy()
    # Lungs: elliptic columns above a dome; the right dome (patient right = -x) sits higher, over the liver.
    rho_r = ((bx + 0.47 * a) / (0.33 * a)) ** 2 + ((by + 0.06 * b) / (0.62 * b)) ** 2
    rho_l = ((bx - 0.47 * a) / (0.33 * a)) ** 2 + ((by + 0.06 * b) / (0.62 * b)) ** 2
    dome_r = 4 + an.dome_mm * np.clip(1 - rho_r, 0, 1)
    dome_l = -4 + an.dome_mm * np.clip(1 - rho_l, 0, 1)
    liver = ((bx + 0.3 * a) / (0.55 * a)) ** 2 + ((by + 0.02 * b) / (0.72 * b)) ** 2 <= 1
    liver = liver & inner & (bz < dome_r - 1.5) & ~((rho_l <= 1) & (bz > dome_l - 1.5)) & (bz > -90)
    labels[np.broadcast_to(liver, shape)] = LIVER
    labels[np.broadcast_to(inner & (rho_r <= 1) & (bz > dome_r), shape)] = LUNG_R
    labels[np.broadcast_to(inner & (rho_l <= 1) & (bz > dome_l), shape)] = LUNG_L
    # Ribs: arcs just inside the fat, in bands of 5 mm every 16 mm (axial cuts through oblique ribs).
    ring = (bx / (a - f - 3.5)) ** 2 + (by / (b - f - 3.5)) ** 2 > 1
    ribs = inner & ring & (by > -0.5 * b) & (np.mod(bz - an.rib_phase, 16.0) < 5.0)
    labels[np.broadcast_to(ribs, shape)] = RIBS
    rs = 0.2 * b  # vertebral body radius, then the posterior arch around the spinal canal
    vertebra = bx**2 + (by - 0.5 * b) ** 2 <= rs**2
    arch = bx**2 + (by - 0.5 * b - rs - 3.5) ** 2 <= 25.0
    labels[np.broadcast_to(vertebra | arch, shape)] = SPINE
    return labels, np.broadcast_to(body & ~inner, shape)


def _placed(plan_an: Anatomy, pts: np.ndarray) -> np.ndarray:
    """Anatomy labels at LPS points ``(..., 3)``."""
    b = pts - np.array([*plan_an.centre, plan_an.diaphragm_z])
    return anatomy_labels(plan_an, b[..., 0], b[..., 1], b[..., 2])[0]


_DIRS = np.array([[x, y, z] for x in (-1, 0, 1) for y in (-1, 0, 1) for z in (-1, 0, 1)], float)
_DIRS = _DIRS / np.maximum(np.linalg.norm(_DIRS, axis=1, keepdims=True), 1)  # 26 unit directions + centre


def _place(rng: np.random.Generator, an: Anatomy, organs: tuple[int, ...], radius: float, extent: float,
           z_range: tuple[float, float], taken: list[tuple[np.ndarray, float]]) -> tuple[np.ndarray, int] | None:
    """A centre whose core lies in one of ``organs`` (lungs: 80 % of it), clear of the ``taken`` lesions."""
    lo = np.array([an.centre[0] - an.half_width, an.centre[1] - an.half_depth, z_range[0] + radius + 2])
    hi = np.array([an.centre[0] + an.half_width, an.centre[1] + an.half_depth, z_range[1] - radius - 2])
    if np.any(hi <= lo):
        return None
    for organ in rng.permutation(np.array(organs)):
        depth = radius if organ == LIVER else 0.8 * radius
        cand = rng.uniform(lo, hi, size=(1500, 3))
        labels = _placed(an, cand[:, None, :] + depth * _DIRS[None])
        cand = cand[np.all(labels == organ, axis=1)]
        for centre, other in taken:
            cand = cand[np.linalg.norm(cand - centre, axis=1) >= extent + other + 1.0]
        if len(cand):
            return cand[0], int(organ)
    return None


def plan_patient(seed: int, index: int, rare: str | None) -> PatientPlan:
    """Sample the geometry, anatomy and lesions of patient ``index`` (``rare``: the rare type it holds, if any)."""
    rng = np.random.default_rng([seed, index])
    pid = f"SYN{index + 1:04d}"
    a, b = rng.uniform(44, 52), rng.uniform(32, 38)
    px = round(rng.uniform(0.9, 1.1), 4)
    n = int(rng.integers(30, 41))
    slice_mm = round(rng.uniform(max(1.5, 60.0 / n), 2.5), 2)
    cols, rows = (int(np.ceil((2 * h + 12) / px / 8) * 8) for h in (a, b))
    centre = (round(rng.uniform(-15, 15), 2), round(rng.uniform(-30, 30), 2))  # table position varies
    origin = (round(centre[0] - (cols - 1) * px / 2 + rng.uniform(-3, 3), 3),
              round(centre[1] - (rows - 1) * px / 2 + rng.uniform(-3, 3), 3), round(rng.uniform(-400, -100), 3))
    length = (n - 1) * slice_mm
    an = Anatomy(
        centre=centre, diaphragm_z=origin[2] + length / 2 + rng.uniform(-8, 8), half_width=a, half_depth=b,
        fat_mm=rng.uniform(3, 7), dome_mm=rng.uniform(8, 14), rib_phase=rng.uniform(0, 16),
        disc_phase=rng.uniform(0, 25),
        tissue_hu={"fat": rng.uniform(-110, -90), "muscle": rng.uniform(38, 52), "liver": rng.uniform(95, 115),
                   "lung": rng.uniform(-880, -830), "noise": rng.uniform(10, 18)},
        bias=tuple(rng.uniform(-8, 8, size=5)),
    )
    kinds = [rare] if rare else []
    kinds += list(rng.choice(COMMON_TYPES, size=int(rng.integers(3, 6)) - len(kinds)))
    taken: list[tuple[np.ndarray, float]] = []
    lesions = []
    for kind in kinds:
        r, ext, params = _lesion_params(rng, kind)
        for _ in range(4):  # shrink a lesion that finds no room, rather than dropping it
            spot = _place(rng, an, ORGANS.get(kind, (LUNG_R, LUNG_L)), r, ext, (origin[2], origin[2] + length), taken)
            if spot is not None:
                break
            r, ext = 0.85 * r, 0.85 * ext
        if spot is None:
            if kind == rare:
                raise RuntimeError(f"patient {index}: no room for a {kind} lesion")  # never seen; keeps counts honest
            continue
        taken.append((spot[0], ext))
        lesions.append(Lesion(
            lesion_id=f"{pid}-L{len(lesions) + 1}", lesion_type=str(kind), organ=spot[1],
            centre=tuple(round(float(v), 3) for v in spot[0]), radius=float(r), extent=float(ext),
            rotation=tuple(Rotation.random(rng=rng).as_matrix().ravel()), params=params,
            seed=int(rng.integers(2**31))))
    return PatientPlan(
        index=index, patient_id=pid, seed=int(rng.integers(2**31)), uid_key=("fewscan-synth", str(seed), pid),
        study_date=(_FIRST_DATE + datetime.timedelta(days=int(rng.integers(0, 3650)))).strftime("%Y%m%d"),
        shape=(n, rows, cols), pixel_mm=px, slice_mm=slice_mm, origin=origin,
        file_order=tuple(int(i) for i in rng.permutation(n)), anatomy=an, lesions=tuple(lesions))


def rare_assignment(seed: int, n_patients: int) -> list[str | None]:
    """The rare type held by each patient (or None): each type goes to ``RARE_SHARE`` of them, at least one."""
    if n_patients < 1:
        raise FewscanError(f"the cohort needs at least one patient (got {n_patients})")
    per_type = max(1, round(RARE_SHARE * n_patients))
    rare: list[str | None] = [t for t in RARE_TYPES for _ in range(per_type)][:n_patients]
    rare += [None] * (n_patients - len(rare))
    return [rare[i] for i in np.random.default_rng([seed, 2**20]).permutation(n_patients)]


def plan_cohort(seed: int = 0, n_patients: int | None = None) -> list[PatientPlan]:
    """Plans for the whole cohort (``DEFAULT_PATIENTS`` when ``n_patients`` is None), without rendering."""
    rare = rare_assignment(seed, DEFAULT_PATIENTS if n_patients is None else n_patients)
    return [plan_patient(seed, i, r) for i, r in enumerate(rare)]


