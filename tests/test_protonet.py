"""ProtoNet logits on hand-made embeddings, and the metric helpers."""

import numpy as np
import torch
from torch import nn

from pipeline.classification.methods.protonet import ProtoNet, proto_logits, prototypes
from pipeline.common.metrics import mean_ci95


def test_logits_are_negative_squared_distance_to_class_means() -> None:
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 6.0]])
    labels = torch.tensor([0, 0, 1, 1])
    protos = prototypes(support, labels, 2)
    assert torch.equal(protos, torch.tensor([[1.0, 0.0], [0.0, 5.0]]))
    query = torch.tensor([[1.0, 1.0], [3.0, 5.0]])
    # by hand: q0 -> p0: 0+1=1, p1: 1+16=17 ; q1 -> p0: 4+25=29, p1: 9+0=9
    assert torch.allclose(proto_logits(query, protos), -torch.tensor([[1.0, 17.0], [29.0, 9.0]]))


def test_protonet_module_uses_encoder_for_support_and_query() -> None:
    net = ProtoNet(nn.Identity())
    sx = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 6.0]])
    logits = net(sx, torch.tensor([0, 0, 1, 1]), torch.tensor([[1.0, 1.0]]), 2)
    assert torch.allclose(logits, -torch.tensor([[1.0, 17.0]]))


def test_cosine_logits_ignore_scale() -> None:
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a = proto_logits(torch.tensor([[3.0, 1.0]]), protos, "cosine")
    b = proto_logits(torch.tensor([[30.0, 10.0]]), protos, "cosine")
    assert torch.allclose(a, b) and a.argmax() == 0


def test_mean_ci95_matches_t_interval() -> None:
    x = [0.5, 0.7, 0.6, 0.8]
    out = mean_ci95(x)
    half = 3.182446305284263 * np.std(x, ddof=1) / 2  # t(0.975, df=3)
    assert np.isclose(out["mean"], 0.65) and np.allclose(out["ci95"], [0.65 - half, 0.65 + half])
    assert mean_ci95([0.3])["ci95"] == [0.3, 0.3]


def test_classification_metrics_by_hand() -> None:
    from pipeline.common.metrics import balanced_accuracy, binary_auc, confusion_matrix, macro_auc

    y = np.array([0, 0, 0, 1])
    pred = np.array([0, 0, 1, 1])
    assert balanced_accuracy(pred, y, 2) == (2 / 3 + 1) / 2
    # scores of the positives (0.9, 0.4) vs negatives (0.5, 0.1): pairs won 1 + 0.5*0 ... = 3 of 4
    assert binary_auc(np.array([0.9, 0.5, 0.4, 0.1]), np.array([True, False, True, False])) == 0.75
    assert binary_auc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5  # ties count half
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    assert macro_auc(probs, np.array([0, 0, 1, 1])) == 1.0
    assert confusion_matrix(y, pred, 2).tolist() == [[2, 1], [0, 1]]


def test_mean_ci95_clips_to_bounds() -> None:
    out = mean_ci95([1.0, 1.0, 0.8, 1.0], bounds=(0.0, 1.0))
    assert out["ci95"][1] == 1.0 and out["ci95"][0] < out["mean"] < 1.0
    assert mean_ci95([1.0, 1.0, 0.8, 1.0])["ci95"][1] > 1.0  # unbounded by default
