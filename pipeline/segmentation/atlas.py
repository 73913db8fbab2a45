"""Atlas propagation baseline: register each support scan to the query, warp its mask, majority-vote.

Registration is `pipeline.registration.classical.register_sitk` (SimpleITK affine, then diffeomorphic
demons by default); masks follow with `warp_labels` (nearest neighbour). For K > 1 supports a query voxel is
foreground when more than half of the warped masks say so (ties go to background).
"""

from __future__ import annotations

import time

import numpy as np

from datasets.volume import Volume
from pipeline.registration.classical import register_sitk, warp_labels


def atlas_segment(supports: list[tuple[Volume, Volume]], query: Volume, kind: str = "affine+demons",
                  seed: int = 0) -> tuple[np.ndarray, float]:
    """Propagate K support masks onto the query grid.

    Args:
        supports: `(image, binary mask)` volume pairs (any grids; world coordinates are used).
        query: the query image `(I, J, K)`.
        kind: `affine`, `affine+demons` or `affine+bspline`.

    Returns:
        Boolean mask on the query grid `(I, J, K)` and the wall-clock seconds (all registrations + warps).
    """
    start = time.perf_counter()
    votes = np.zeros(query.array.shape[:3], np.int32)
    for image, mask in supports:
        _, transform, _ = register_sitk(query, image, kind, seed=seed)
        mask_u8 = Volume(np.asarray(mask.array, np.uint8), mask.affine, mask.meta)
        votes += np.asarray(warp_labels(mask_u8, query, transform).array) > 0
    return votes * 2 > len(supports), time.perf_counter() - start
