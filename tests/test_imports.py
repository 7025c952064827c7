"""The import graph of the five packages: layers import only downward, no module imports
itself through others (imports inside functions and under TYPE_CHECKING count), and the
command line starts without the heavy libraries."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Lowest first: each package may import only itself and the ones before it.
LAYERS = ("model", "data_shards", "orchestration", "tune_spaces", "jlstm")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its syntax tree."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` imports pkg.mod when that is a module.
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for layer in LAYERS for p in (REPO / layer).rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, modules) - {name} for name, path in paths.items()}


def test_layers_import_only_downward() -> None:
    upward = [
        f"{name} imports {dep}"
        for name, deps in _graph().items() for dep in deps
        if LAYERS.index(dep.split(".")[0]) > LAYERS.index(name.split(".")[0])
    ]
    assert not upward


def test_no_import_circle() -> None:
    graph = _graph()
    # Tarjan's strongly connected components, iteratively: a component of more than
    # one module is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    assert not circles


def test_the_command_line_starts_without_ray_train_torch_or_mlflow() -> None:
    heavy = ("ray", "ray.train", "ray.data", "torch", "mlflow", "pyarrow")
    out = subprocess.run(
        [sys.executable, "-c", "import sys, jlstm.cli; jlstm.cli.build_parser(); "
         f"print(','.join(m for m in {heavy!r} if m in sys.modules))"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    assert out.stdout.strip() == ""


def test_metric_names_are_spelled_out_in_one_module() -> None:
    """`orchestration/metrics.py` names what a run reports; the rest import the names."""
    spelled = sorted(
        str(path.relative_to(REPO))
        for layer in LAYERS for path in (REPO / layer).rglob("*.py")
        if "val_video_top1_vote" in path.read_text()
    )
    assert spelled == ["orchestration/metrics.py"]


def _parameters(layer: str) -> list[tuple[str, ast.arg]]:
    """("module.function", parameter) of every def in `layer`'s modules, nested ones too."""
    found = []
    for path in sorted((REPO / layer).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                every = [*args.posonlyargs, *args.args, *args.kwonlyargs,
                         *filter(None, [args.vararg, args.kwarg])]
                found += [(f"{_module_name(path)}.{node.name}", arg) for arg in every]
    return found


def test_data_shards_takes_a_clip_spec_not_the_model_config() -> None:
    """`data_shards` reads five things of the model (`data_shards/clip_spec.py`): its
    functions take a `ClipSpec`, and only `ClipSpec.of` takes the model's config. Every
    parameter is annotated, none `Any`: an untyped one could carry a model config again."""
    params = _parameters("data_shards")
    assert len(params) > 100  # the walk found the package's functions
    the_door = "data_shards.clip_spec.of"  # ClipSpec.of(model_cfg: ModelConfig)
    wrong = [
        f"{where}({arg.arg}: {ast.unparse(arg.annotation) if arg.annotation else 'untyped'})"
        for where, arg in params
        if arg.arg not in ("self", "cls") and (
            arg.annotation is None
            or re.search(r"\bAny\b", ast.unparse(arg.annotation))
            or (where != the_door and (
                "model_cfg" in arg.arg or "ModelConfig" in ast.unparse(arg.annotation)
            ))
        )
    ]
    assert not wrong


# The tracking interface: only these build an MLflow client or call `mlflow.*`; the pyfunc
# (`mlflow_model.py`) is MLflow's own kind of code. Other files may import its exceptions.
MLFLOW_OWNERS = {"orchestration.tracking", "orchestration.registry",
                 "orchestration.epoch_logger", "orchestration.mlflow_model"}


def test_mlflow_is_reached_through_the_tracking_interface() -> None:
    reaching = []
    for layer in LAYERS:
        for path in (REPO / layer).rglob("*.py"):
            if _module_name(path) in MLFLOW_OWNERS:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                reaching += [
                    f"{_module_name(path)}:{node.lineno} imports {name}" for name in names
                    if name.split(".")[0] == "mlflow" and name != "mlflow.exceptions"
                ]
    assert not reaching
