"""The bare-name packages must resolve to this repository (a pip-installed `datasets` would shadow ours)."""

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["datasets", "transforms", "pipeline"])
def test_packages_import_from_this_repo(name: str) -> None:
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO / name


def test_no_init_in_configs_or_tests() -> None:
    assert not (REPO / "configs" / "__init__.py").exists()
    assert not (REPO / "tests" / "__init__.py").exists()


def test_progress_bars_redraw_rarely_in_logs(monkeypatch) -> None:
    """Not a terminal (CI, log files): at most one redraw per 30 s; in a terminal tqdm's own default."""
    import io

    from pipeline.common.progress import LOG_INTERVAL_S, progress

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress(range(3)).mininterval == LOG_INTERVAL_S
    tty = io.StringIO()
    tty.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr("sys.stderr", tty)
    assert progress(range(3)).mininterval == 0.1


# --- import direction: datasets <- transforms <- pipeline.common <- pipeline.nn <- task kinds <- __main__ ---------
PACKAGES = ("datasets", "transforms", "pipeline")
KINDS = ("classification", "segmentation", "registration")
# The imports across task kinds, all segmentation building on registration: the atlas baseline registers with the
# classical path, learned label propagation with the registration network (its losses, warping and Reptile tasks).
ALLOWED_ACROSS = {("segmentation", f"pipeline.registration.{m}") for m in ("classical", "network", "deformation",
                                                                           "episodes")}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere (module level or inside functions): lazy imports count too."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in PACKAGES:
                found.add(name)
    return found


def _layer(module: str) -> tuple[int, str]:
    """(rank, room): a module may import modules of lower or equal rank; task kinds only their own room."""
    parts = module.split(".")
    if parts[0] in ("datasets", "transforms"):
        return (0 if parts[0] == "datasets" else 1), parts[0]
    if len(parts) == 1:
        return 2, "pipeline"
    room = parts[1]
    # the command line and the verbs that span task kinds (demo, export) sit above every room
    return {"common": 2, "nn": 3, "__main__": 5, "demo": 5, "export": 5}.get(room, 4), room


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, set(modules)) - {m} for m, p in modules.items()}


def test_imports_run_one_way() -> None:
    bad = []
    for module, deps in _graph().items():
        rank, room = _layer(module)
        for dep in deps:
            dep_rank, dep_room = _layer(dep)
            if dep_rank > rank:
                bad.append(f"{module} imports {dep} (a later layer)")
            elif rank == dep_rank == 4 and room != dep_room and (room, dep) not in ALLOWED_ACROSS:
                bad.append(f"{module} imports {dep} (another task kind)")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    graph = _graph()
    # A package's __init__ is imported by its submodules implicitly; cycles through it are not what this guards.
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*stack[stack.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_every_task_kind_has_the_protocol() -> None:
    import inspect

    from pipeline.__main__ import TASKS, task_module

    for kind in TASKS:
        module = task_module(kind)
        for name in ("train", "evaluate", "summary_table", "fixed_episodes", "adapt", "predict"):
            assert callable(getattr(module, name, None)), f"{kind}: no {name}"
        assert list(inspect.signature(module.train).parameters)[:3] == ["cfg", "run_dir", "resume"], kind
        assert {"episodes_file", "overrides"} <= set(inspect.signature(module.evaluate).parameters), kind


def test_benchmark_imports_resolve() -> None:
    """Benchmarks import project names inside functions, which no other test runs: a moved or renamed function
    must not leave a benchmark that fails on import (`bench_registration.py real` did after the restructure)."""
    import ast
    import importlib.util

    missing = []
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.split(".")[0] in ("pipeline", "datasets", "transforms")):
                continue
            module = importlib.import_module(node.module)
            missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                        if not hasattr(module, a.name) and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert not missing, missing
