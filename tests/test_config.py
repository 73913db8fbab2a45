"""Config loading: defaults, `extends`, `--set` overrides, and one-line errors naming the key."""

from pathlib import Path

import pytest

from pipeline.__main__ import main
from pipeline.common.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_extends_and_overrides(tmp_path: Path) -> None:
    write(tmp_path, "seed: 3\ntrain:\n  lr: 0.01\n  iterations: 7\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\ntrain:\n  iterations: 9\n")
    cfg = load_config(child, ["shots=2", "episodes.ways=4", "split.novel=[a, b]"])
    assert (cfg.seed, cfg.train.lr, cfg.train.iterations) == (3, 0.01, 9)
    assert (cfg.episodes.shots, cfg.episodes.ways, cfg.split.novel) == (2, 4, ["a", "b"])


@pytest.mark.parametrize(("text", "overrides", "needle"), [
    ("train:\n  lrr: 1\n", [], "unknown key 'train.lrr'"),
    ("bogus: 1\n", [], "unknown key 'bogus'"),
    ("", ["train.iterations=-1"], "'train.iterations'"),
    ("", ["train.lr=fast"], "'train.lr'"),
    ("episodes:\n  shots: 0\n", [], "'episodes.shots'"),
    ("method:\n  name: nosuch\n", [], "'method.name'"),
    ("", ["nokey"], "expected key=value"),
    ("[1, 2]\n", [], "mapping"),
])
def test_bad_config_is_one_line_error(tmp_path: Path, text: str, overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_config_error_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, "train:\n  itterations: 5\n")
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown key 'train.itterations'" in err
    assert not run.exists()


def test_shipped_configs_validate() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)
