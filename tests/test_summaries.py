"""The evaluation side shared by the task kinds: metric blocks, paired differences, summary-table text, the episode
seed rule and the `evaluate --set` keys of each kind."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy import stats

from pipeline.common.config import ConfigError, evaluation_tag
from pipeline.common.episodes import stream_seed
from pipeline.common.metrics import mean_ci95, metric_block, paired_differences
from pipeline.common.report import ci_text, paired_lines, text_table


def test_paired_differences_are_item_by_item() -> None:
    ours, theirs = [0.5, 0.7, 0.9], [0.4, 0.7, 0.6]
    out = paired_differences(ours, {"baseline_x": theirs, "untrained": ours})
    d = out["baseline_x"]["dice"]
    half = stats.t.ppf(0.975, 2) * np.std([0.1, 0.0, 0.3], ddof=1) / math.sqrt(3)
    assert d["mean"] == pytest.approx(0.4 / 3) and d["n"] == 3
    assert d["ci95"] == pytest.approx([0.4 / 3 - half, 0.4 / 3 + half])
    assert out["untrained"]["dice"]["mean"] == 0.0 and out["untrained"]["dice"]["ci95"] == [0.0, 0.0]
    # unpaired, the means would differ the same, but the spread of the differences is what the interval is about
    assert paired_differences([1.0, 2.0], {"b": [0.0, 1.0]}, metric="hd95")["b"]["hd95"]["ci95"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="2 items against 3"):
        paired_differences(ours, {"short": [0.1, 0.2]})


def test_metric_block_overall_and_per_structure() -> None:
    items = [{"dice": 0.8, "hd95": 2.0, "per_structure": {"liver": {"dice": 0.9, "hd95": 1.0},
                                                           "spleen": {"dice": 0.7, "hd95": 3.0}}},
             {"dice": 0.6, "hd95": 4.0, "per_structure": {"liver": {"dice": 0.6, "hd95": 4.0}}},
             {"dice": float("nan"), "hd95": float("nan"), "per_structure": {}}]  # a pair with no structure
    block = metric_block(items, ("dice", "hd95"))
    dice, hd95 = (0.0, 1.0), (0.0, math.inf)  # each metric's range (BOUNDS)
    assert block["metrics"]["dice"] == mean_ci95([0.8, 0.6], dice)
    assert block["metrics"]["hd95"] == mean_ci95([2.0, 4.0], hd95)
    assert list(block["per_structure"]) == ["liver", "spleen"]
    assert block["per_structure"]["liver"]["dice"] == mean_ci95([0.9, 0.6], dice)
    assert block["per_structure"]["spleen"]["hd95"] == mean_ci95([3.0], hd95)
    assert math.isnan(metric_block(items[2:], ("dice",))["metrics"]["dice"]["mean"])


def test_intervals_stay_inside_each_metric_range() -> None:
    """A t-interval over few, spread values leaves the range: Dice below 0, HD95 below 0, a difference below -1."""
    items = [{"dice": d, "hd95": h, "per_structure": {"liver": {"dice": d, "hd95": h}}}
             for d, h in ((0.0, 30.0), (0.95, 0.5), (0.9, 1.0))]
    block = metric_block(items, ("dice", "hd95"))
    raw = mean_ci95([0.0, 0.95, 0.9])["ci95"]
    assert raw[0] < 0.0  # what the report showed before: Dice [-0.41, 0.94]
    for b in (block["metrics"], block["per_structure"]["liver"]):
        assert b["dice"]["ci95"] == [0.0, pytest.approx(min(raw[1], 1.0))]
        assert b["hd95"]["ci95"][0] == 0.0 and b["hd95"]["ci95"][1] > 10.0
    diff = paired_differences([0.0, 1.0, 1.0], {"b": [1.0, 0.0, 0.0]})["b"]["dice"]["ci95"]
    assert -1.0 <= diff[0] and diff[1] <= 1.0 and diff[0] == -1.0


def test_summary_text_rows_and_paired_lines() -> None:
    m = {"mean": 0.5, "ci95": [0.4, 0.625]}
    assert ci_text(m) == "0.500 [0.400, 0.625]"
    assert ci_text(m, digits=1, scale=100) == "50.0 [40.0, 62.5]"
    assert ci_text({"mean": 0.02, "ci95": [-0.01, 0.05]}, signed=True) == "+0.020 [-0.010, +0.050]"
    table = text_table("title", ["method", "Dice"], [["proto", "0.500 [0.400, 0.625]"], ["atlas-long", "0.1"]],
                       ["  note"])
    assert table.splitlines() == ["title", "  method      Dice", "  proto       0.500 [0.400, 0.625]",
                                  "  atlas-long  0.1", "  note"]
    report = {"paired": {"baseline_atlas": {"dice": {"mean": -0.1, "ci95": [-0.2, 0.0]}}}}
    assert paired_lines(report, "proto", {"baseline_atlas": "atlas"}) == [
        "  paired Dice, proto minus atlas: -0.100 [-0.200, +0.000]"]
    assert paired_lines({}, "proto", {}) == []


def test_one_seed_rule_for_every_stream() -> None:
    # the offsets classification has always used: changing them changes every fixed episode set and `make demo`
    assert [stream_seed(7, s) for s in ("train", "validation", "evaluation")] == [7, 7 + 500_009, 7 + 1_000_003]
    with pytest.raises(ValueError, match="unknown episode stream"):
        stream_seed(0, "test")


def test_evaluation_keys_and_tags_per_task_kind() -> None:
    assert evaluation_tag(["shots=5", "train.threads=2"], "segmentation") == "shots5"
    assert evaluation_tag(["episodes.eval_episodes=3", "seed=1"], "classification") == "episodes3_seed1"
    assert evaluation_tag(["registration.instance_steps=5", "registration.adapt_lr=0.01", "train.device=cpu"],
                          "registration") == "instance_steps5_adapt_lr0.01"
    refused = (("shots=1", "registration", "episodes.shots"), ("seed=1", "registration", "seed"),
               ("registration.adapt_steps=1", "segmentation", "registration.adapt_steps"),
               ("ways=3", "segmentation", "episodes.ways"), ("model.encoder=x", "classification", "model.encoder"))
    for item, task, key in refused:
        with pytest.raises(ConfigError, match=f"^evaluate --set {re.escape(key)}: only .* a {task} run"):
            evaluation_tag([item], task)
