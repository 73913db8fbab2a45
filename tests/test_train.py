"""Meta-training loop on a tiny npz source: run-directory contract, validation, exact resume, early stop."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.classification.train import train
from pipeline.common.config import load_config

REPO = Path(__file__).resolve().parents[1]


def tiny_npz(path: Path, n_classes: int = 7, per_class: int = 6, size: int = 16) -> Path:
    """Class c: a bright square at a class-specific position, plus noise (uint8, like MedMNIST)."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for c in range(n_classes):
        for _ in range(per_class):
            img = rng.integers(0, 60, (size, size))
            r, col = divmod(c * 3, size - 4)
            img[r:r + 4, col:col + 4] = 250
            images.append(img)
            labels.append(c)
    np.savez(path, images=np.asarray(images, np.uint8), labels=np.asarray(labels),
             class_names=np.asarray([f"c{c}" for c in range(n_classes)]))
    return path


def tiny_config(tmp_path: Path, *overrides: str):
    npz = tiny_npz(tmp_path / "tiny.npz")
    return load_config(REPO / "configs" / "classify_npz.yaml", [
        f"data.root={npz}", "split.novel=[c5, c6]", "split.validation=[c3, c4]", "model.encoder=conv4_2d",
        "model.filters=4", "model.norm_groups=2", "ways=2", "shots=1", "queries=2", "episodes.eval_episodes=4",
        "train.iterations=4", "train.log_every=2", "train.val_every=2", "train.val_episodes=2",
        "train.checkpoint_every=2", "train.device=cpu", *overrides])


def test_resume_gives_identical_weights(tmp_path: Path) -> None:
    overrides = ["method.name=maml", "method.inner_steps=1", "method.meta_batch=2"]
    full = train(tiny_config(tmp_path, *overrides), tmp_path / "full")
    part = tmp_path / "part"
    train(tiny_config(tmp_path, *overrides), part, stop_at=2)
    assert not (part / "model.safetensors").exists()  # an interrupted run has no final model yet
    train(tiny_config(tmp_path, *overrides), part, resume=True)
    for name in ["last/model.safetensors", "model.safetensors", "best/model.safetensors"]:
        a, b = load_file(str(full / name)), load_file(str(part / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (full / "curves.json").read_text() == (part / "curves.json").read_text()


def curves_val(run: Path) -> int:
    import json

    return len(json.loads((run / "curves.json").read_text())["val_accuracy"])


def test_run_directory_contract_and_early_stop(tmp_path: Path) -> None:
    run = train(tiny_config(tmp_path, "train.lr=1e-12", "train.patience=1", "train.iterations=8"), tmp_path / "run")
    for name in ["config.yaml", "split.json", "untrained.safetensors", "model.safetensors", "curves.json",
                 "learning_curve.png", "state.json", "last/state.json", "last/optimizer.safetensors",
                 "best/model.safetensors"]:
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    import json

    state = json.loads((run / "state.json").read_text())
    # lr ~ 0: validation accuracy cannot improve after the first check, so patience 1 stops at the second
    assert state["stopped_early"] and state["iterations"] == 4 and curves_val(run) == 2


def test_vmap_meta_batch_trains_like_the_task_loop(tmp_path: Path) -> None:
    """Also: vmap takes precedence over task threads, so with both set the intra-op threads stay as they were."""
    runs, threads = [], torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for vmap in ("false", "true"):
            cfg = tiny_config(tmp_path, "method.name=maml", "method.inner_steps=1", "method.meta_batch=2",
                              f"method.vmap={vmap}", "method.task_threads=2" if vmap == "true" else "seed=0",
                              "train.iterations=1", "train.val_every=0")
            runs.append(load_file(str(train(cfg, tmp_path / f"vmap_{vmap}") / "model.safetensors")))
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert all(torch.allclose(runs[0][k], runs[1][k], atol=1e-6) for k in runs[0])


def test_task_threads_zero_means_this_process_share_of_its_cores(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`method.task_threads: 0`: the cores this process may run on, split between torchrun ranks, at most the
    rank's tasks; a number is taken as it is; off the CPU always 1."""
    import pipeline.classification.train as train_module
    from pipeline.common.distributed import World

    monkeypatch.setattr(train_module.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    cpu = torch.device("cpu")
    auto = tiny_config(tmp_path, "method.name=maml", "method.meta_batch=3", "method.task_threads=0")
    assert train_module.task_threads(auto, cpu, World()) == 3  # 8 cores, 3 tasks
    assert train_module.task_threads(auto, cpu, World(rank=0, size=4)) == 1  # 2 cores, tasks 0 only
    wide = tiny_config(tmp_path, "method.name=maml", "method.meta_batch=16", "method.task_threads=0")
    assert train_module.task_threads(wide, cpu, World(rank=1, size=2)) == 4  # 4 cores, 8 tasks
    fixed = tiny_config(tmp_path, "method.name=maml", "method.meta_batch=3", "method.task_threads=5")
    assert train_module.task_threads(fixed, cpu, World()) == 5
    assert train_module.task_threads(auto, torch.device("cuda"), World()) == 1


def test_task_threads_train_like_the_task_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.classification.train as train_module

    calls = []
    real = train_module.threaded_task_grads
    monkeypatch.setattr(train_module, "threaded_task_grads", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = []
    for threads in (1, 2):
        cfg = tiny_config(tmp_path, "method.name=maml", "method.inner_steps=1", "method.meta_batch=3",
                          f"method.task_threads={threads}", "train.iterations=2", "train.val_every=0")
        runs.append(load_file(str(train(cfg, tmp_path / f"threads_{threads}") / "model.safetensors")))
    assert len(calls) == 2  # the threaded path ran once per iteration of the 2-thread run, never in the other
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_pretraining_learns_the_base_classes_and_changes_only_the_encoder(tmp_path: Path) -> None:
    """Supervised pre-training alone: the checkpointed base-class head on the saved encoder classifies the 3 base
    classes of the tiny set (chance 0.33), and the model's weights keep their names (no head inside)."""
    import json

    from pipeline.classification.data import open_source
    from pipeline.classification.train import build_model, encoder_of
    from pipeline.common.run import load_run_config, load_weights

    run = train(tiny_config(tmp_path, "method.name=protonet", "train.iterations=40", "train.pretrain_iterations=40",
                            "train.pretrain_batch=20", "train.lr=0.01", "train.log_every=10", "train.val_every=0"),
                tmp_path / "run")
    before, after = load_file(str(run / "untrained.safetensors")), load_file(str(run / "model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    head = load_file(str(run / "last" / "extra.safetensors"))
    weight, bias = (next(v for k, v in head.items() if k.endswith(name)) for name in ("weight", "bias"))
    cfg, split = load_run_config(run), json.loads((run / "split.json").read_text())
    encoder = encoder_of(load_weights(build_model(cfg, n_base=len(split["base"])), run / "model.safetensors"))
    items = open_source(cfg).items(split["base"])
    with torch.no_grad():
        predicted = (encoder.eval()(items.x) @ weight.T + bias).argmax(-1)
    truth = torch.tensor([split["base"].index(c) for c in items.labels])
    assert weight.shape[0] == len(split["base"]) == 3
    assert float((predicted == truth).float().mean()) >= 0.9
