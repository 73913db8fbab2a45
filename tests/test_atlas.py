"""Atlas propagation baseline: a known translation is recovered and the support mask lands on the query."""

from __future__ import annotations

import numpy as np

from datasets.synth_decathlon import synthetic_case
from datasets.volume import Volume
from pipeline.common.metrics import dice_hd95
from pipeline.segmentation.atlas import atlas_segment


def test_atlas_recovers_a_known_translation() -> None:
    image, label = synthetic_case(np.random.default_rng(3), (32, 36, 30))
    mask = label == 1
    shift = (3, -2, 2)  # voxels; 2 mm spacing -> 6, -4, 4 mm
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    query = Volume(image, affine)
    support_img, support_mask = np.roll(image, shift, (0, 1, 2)), np.roll(mask, shift, (0, 1, 2))
    before = dice_hd95(support_mask, mask, (2, 2, 2))[0]
    pred, seconds = atlas_segment([(Volume(support_img, affine), Volume(support_mask.astype(np.uint8), affine))],
                                  query, kind="affine")
    after = dice_hd95(pred, mask, (2, 2, 2))[0]
    assert pred.shape == mask.shape and seconds > 0
    assert after > 0.9 > before


def test_majority_vote_of_three_supports() -> None:
    image, label = synthetic_case(np.random.default_rng(4), (24, 28, 24))
    affine = np.eye(4)
    good = (Volume(image, affine), Volume((label == 1).astype(np.uint8), affine))
    empty = (Volume(image, affine), Volume(np.zeros_like(label, np.uint8), affine))
    pred, _ = atlas_segment([good, good, empty], Volume(image, affine), kind="affine")
    assert dice_hd95(pred, label == 1, (1, 1, 1))[0] > 0.95  # two of three vote foreground
    pred, _ = atlas_segment([good, empty, empty], Volume(image, affine), kind="affine")
    assert not pred.any()
