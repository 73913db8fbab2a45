"""Prototype segmentation: masked average pooling, local prototypes, cosine decoding."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.common.metrics import dice_hd95
from pipeline.segmentation.proto import ProtoSeg, fit_proto, local_prototypes, masked_average_pooling


def test_masked_average_pooling_equals_hand_computed_mean() -> None:
    torch.manual_seed(0)
    f = torch.randn(2, 3, 4, 5)
    m = torch.zeros(2, 1, 4, 5)
    m[0, 0, 1, 2] = m[0, 0, 3, 4] = m[1, 0, 0, 0] = 1
    expected = (f[0, :, 1, 2] + f[0, :, 3, 4] + f[1, :, 0, 0]) / 3
    assert torch.allclose(masked_average_pooling(f, m), expected, atol=1e-4)


def test_local_prototypes_keep_only_windows_inside_the_mask() -> None:
    f = torch.arange(16.0).reshape(1, 1, 4, 4)
    m = torch.zeros(1, 1, 4, 4)
    m[..., :2, :2] = 1  # exactly the top-left 2x2 window
    protos = local_prototypes(f, m, pool=2, threshold=0.95)
    assert protos.shape == (1, 1)
    assert torch.allclose(protos[0], f[0, 0, :2, :2].mean().reshape(1), atol=1e-3)


def _toy(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-channel 'features' that separate foreground (1, 0) from background (0, 1) perfectly."""
    mask = torch.zeros(1, 1, *shape)
    mask[(..., *[slice(s // 4, 3 * s // 4) for s in shape])] = 1
    return torch.cat([mask, 1 - mask], 1), mask


def test_separable_features_give_dice_one_2d_and_3d() -> None:
    for shape in ((16, 12), (8, 10, 6)):
        x, mask = _toy(shape)
        model = ProtoSeg(nn.Identity(), divisor=1, scale=20.0, local_pool=2)
        logits = model(x, mask, x)
        assert logits.shape == (1, 2, *shape)
        pred = (logits.argmax(1)[0] == 1).numpy()
        assert dice_hd95(pred, mask[0, 0].numpy().astype(bool), (1.0,) * len(shape))[0] == 1.0
        # Prototypes from items of different sizes (the evaluation path) give the same answer.
        predictor = fit_proto(model, [x, x[..., :-2]], [mask, mask[..., :-2]])
        assert (predictor(x).argmax(1)[0].numpy() == 1).tolist() == pred.tolist()


def test_empty_support_mask_does_not_produce_nan() -> None:
    x, _ = _toy((8, 8))
    logits = ProtoSeg(nn.Identity())(x, torch.zeros(1, 1, 8, 8), x)
    assert torch.isfinite(logits).all()


def test_every_configured_monai_backbone_gives_dense_features_2d_and_3d() -> None:
    from pipeline.common.config import validate
    from pipeline.segmentation.proto import build_proto_seg

    for encoder in ("unet", "basicunet", "segresnet"):
        for mode, shape in (("2d", (20, 18)), ("3d", (10, 12, 9))):
            scfg = validate({"task": "segmentation", "segmentation": {
                "encoder": encoder, "mode": mode, "channels": [4, 8], "features": 6}}).segmentation
            model = build_proto_seg(scfg).eval()
            x = torch.rand(1, 1, *shape)
            with torch.no_grad():
                assert model.features(x).shape == (1, 6, *shape), (encoder, mode)
                assert model(x, (x > 0.5).float(), x).shape == (1, 2, *shape)


def test_chunked_scoring_equals_scoring_all_prototypes_at_once() -> None:
    from pipeline.segmentation.proto import class_scores

    g = torch.Generator().manual_seed(0)
    query, protos = torch.randn(2, 8, 12, 10, generator=g), torch.randn(300, 8, generator=g)
    with torch.enable_grad():  # the one-go path
        full = class_scores(query, protos, 20.0)
    with torch.no_grad():
        chunked = class_scores(query, protos, 20.0, chunk=7)  # 43 chunks, the last one short
    assert torch.allclose(chunked, full.detach(), atol=1e-4)


def test_support_prototypes_are_capped_and_keep_the_global_one() -> None:
    from pipeline.segmentation.proto import PROTOTYPE_CAP, cap_prototypes

    protos = torch.arange(3000 * 2, dtype=torch.float32).reshape(3000, 2)
    capped = cap_prototypes(protos)
    assert capped.shape == (PROTOTYPE_CAP, 2) and torch.equal(capped[0], protos[0])
    assert torch.equal(capped, cap_prototypes(protos))  # deterministic
    assert len(torch.unique(capped[:, 0])) == PROTOTYPE_CAP  # no prototype twice
    assert capped[-1, 0] == protos[-1, 0]  # evenly spread to the last one
    assert torch.equal(cap_prototypes(protos[:10]), protos[:10])


def test_score_stride_scores_a_coarser_grid_at_prediction_only(monkeypatch) -> None:
    import pipeline.segmentation.proto as proto

    seen: list[tuple[int, ...]] = []
    real = proto.class_scores
    monkeypatch.setattr(proto, "class_scores", lambda q, p, s: seen.append(tuple(q.shape)) or real(q, p, s))
    fine, coarse = ProtoSeg(nn.Identity()), ProtoSeg(nn.Identity(), score_stride=2)
    bg, fg = torch.randn(6, 4), torch.randn(3, 4)
    fq = torch.randn(1, 4, 16, 12)
    with torch.no_grad():
        out = coarse.decode(fq, bg, fg)
    assert out.shape == (1, 2, 16, 12) and seen == [(1, 4, 8, 6)] * 2  # a quarter of the voxels scored
    seen.clear()
    train = coarse.decode(fq.requires_grad_(), bg, fg)  # training: every voxel, so gradients are exact
    assert seen == [(1, 4, 16, 12)] * 2 and train.requires_grad
    flat = torch.randn(1, 4, 1, 1).expand(1, 4, 16, 12)  # features constant over the image: no detail to lose
    with torch.no_grad():
        torch.testing.assert_close(coarse.decode(flat, bg, fg), fine.decode(flat, bg, fg))
