"""Dependencies flow one way: cli → engine → distill → models → (losses, assigners) → ops; data serves engine/cli.
Inside the engine, the job folders flow one way too: tools → training → prediction → evaluation → deployment.

The import graph sees every `import` and `from ... import` anywhere in a file (function-level, TYPE_CHECKING and
relative imports included), resolved to the crosskd module it loads, so a cycle hidden inside a function still shows.
"""

import ast
from pathlib import Path

import crosskd

PACKAGE = Path(crosskd.__file__).parent
GROUND = {"errors", "dist", "utils", "paths", "user_settings"}  # usable from every layer
SETTINGS = {"config", "settings"}  # run settings (schema and validation): engine, api and cli only
ROOT_GROUND_NAMES = {"__version__"}  # `from crosskd import __version__` is ground; `Detector` is the api layer
BELOW = {"ops": set(), "losses": {"ops"}, "assigners": {"ops"}, "data": set()}
BELOW["models"] = {"losses", "assigners", "ops"}
BELOW["distill"] = BELOW["models"] | {"models"}
BELOW["engine"] = BELOW["distill"] | {"distill", "data"} | SETTINGS
BELOW["api"] = BELOW["engine"] | {"engine"}
BELOW["cli"] = BELOW["api"] | {"api"}
BELOW["__main__"] = {"cli"}
BELOW["__init__"] = {"api"}
for part in GROUND:
    BELOW[part] = set()
DATA_TABLES = {  # plain-data tables the run settings read their choices from
    "crosskd.engine.deployment.formats",  # the export format table (format=)
    "crosskd.distill.registry",  # the KD method registry (kd=)
}
for part in SETTINGS:
    BELOW[part] = set(SETTINGS)
ENGINE_BELOW = {"deployment": set(), "evaluation": {"deployment"}}
ENGINE_BELOW["prediction"] = ENGINE_BELOW["evaluation"] | {"evaluation"}
ENGINE_BELOW["training"] = ENGINE_BELOW["prediction"] | {"prediction"}
ENGINE_BELOW["tools"] = ENGINE_BELOW["training"] | {"training"}


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name → file for every .py under the package directory `root` (packages by their __init__)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _known(name: str, known: set[str]) -> str | None:
    """The longest prefix of `name` that is a known module (None outside the package)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None


def _from_targets(node: ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Modules a `from X import a, b` loads: X.a when it is a submodule, else X itself."""
    if node.level:
        base = module if is_package else module.rpartition(".")[0]
        base = ".".join(base.split(".")[: len(base.split(".")) - node.level + 1])
        source = f"{base}.{node.module}" if node.module else base
    else:
        source = node.module
    targets = set()
    for alias in node.names:
        if f"{source}.{alias.name}" in known:
            targets.add(f"{source}.{alias.name}")
        elif "." in source or alias.name not in ROOT_GROUND_NAMES:
            targets.add(_known(source, known))
    return targets - {None}


def imported_modules(path: Path, module: str, known: set[str]) -> set[str]:
    """Known modules that the file of `module` imports anywhere (top level, in functions, under TYPE_CHECKING)."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            targets |= _from_targets(node, module, is_package, known)
        elif isinstance(node, ast.Import):
            targets |= {_known(alias.name, known) for alias in node.names} - {None}
    return targets - {module}


def import_graph(root: Path) -> dict[str, set[str]]:
    """module → the package's modules it imports, for the package directory `root`."""
    files = module_names(root)
    return {name: imported_modules(path, name, set(files)) for name, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle path [a, b, ..., a] per back edge of a depth-first search (empty when the graph is acyclic)."""
    cycles, done, stack = [], set(), []

    def visit(node: str) -> None:
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target in stack:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in done:
                visit(target)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return cycles


def layer(module: str) -> str:
    """The layer of a crosskd module: its first name below the package (`crosskd.engine.training.trainer` → engine)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def engine_job(module: str) -> str | None:
    """The job folder of an engine module (`crosskd.engine.training.trainer` → training); None outside one."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "engine" else None


def engine_job_violations(graph: dict[str, set[str]]) -> list[str]:
    """'a imports b' for every engine module importing a job folder above its own, or one that is in no folder."""
    violations = []
    for module, targets in sorted(graph.items()):
        job = engine_job(module)
        if layer(module) != "engine" or module == "crosskd.engine":
            continue
        if job not in ENGINE_BELOW:
            violations.append(f"{module} is in no engine job folder: add it to ENGINE_BELOW in tests/test_layers.py")
            continue
        allowed = ENGINE_BELOW[job] | {job}
        violations += [f"{module} imports {target}" for target in sorted(targets)
                       if layer(target) == "engine" and engine_job(target) not in allowed]
    return violations


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """'a imports b' for every import of a layer that is neither the module's own, a lower one nor allowed ground."""
    violations = []
    for module, targets in sorted(graph.items()):
        part = layer(module)
        if part not in BELOW:
            violations.append(f"{module} belongs to no layer: add '{part}' to BELOW in tests/test_layers.py")
            continue
        allowed = BELOW[part] | {part} | GROUND
        tables = DATA_TABLES if part in SETTINGS else set()
        violations += [f"{module} imports {target}" for target in sorted(targets)
                       if layer(target) not in allowed and target not in tables]
    return violations


def test_no_import_cycles():
    cycles = find_cycles(import_graph(PACKAGE))
    assert [" -> ".join(cycle) for cycle in cycles] == []


def test_no_upward_imports_and_settings_only_in_engine_api_cli():
    assert layer_violations(import_graph(PACKAGE)) == []


def test_the_tables_settings_read_are_plain_data():
    graph = import_graph(PACKAGE)
    for table in DATA_TABLES:
        assert {layer(target) for target in graph[table]} <= GROUND, table
        nodes = ast.walk(ast.parse(module_names(PACKAGE)[table].read_text()))
        imported = {(node.names[0].name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
                    for node in nodes if isinstance(node, ast.Import | ast.ImportFrom)}
        assert not imported & {"torch", "torchvision", "numpy", "cv2"}, table
    reads = {"crosskd.settings": {"crosskd.distill.registry"}, "crosskd.models.fake": {"crosskd.distill.registry"}}
    assert layer_violations(reads) == ["crosskd.models.fake imports crosskd.distill.registry"]


def test_engine_job_folders_import_only_downwards():
    assert engine_job_violations(import_graph(PACKAGE)) == []


def test_the_engine_checker_flags_an_upward_import():
    graph = {
        "crosskd.engine.deployment.exporter": {"crosskd.engine.evaluation.validator", "crosskd.models"},
        "crosskd.engine.tools.info": {"crosskd.engine.deployment.loader", "crosskd.engine.training.trainer"},
        "crosskd.engine.stray": set(),
    }
    assert engine_job_violations(graph) == [
        "crosskd.engine.deployment.exporter imports crosskd.engine.evaluation.validator",
        "crosskd.engine.stray is in no engine job folder: add it to ENGINE_BELOW in tests/test_layers.py",
    ]


def test_the_checker_sees_every_kind_of_import(tmp_path):
    module = tmp_path / "fake.py"
    module.write_text(
        "from crosskd.engine.training.trainer import Trainer\n"
        "import crosskd.models.heads.base as base\n"
        "from crosskd import __version__\n"
        "from . import checkpoint\n"
        "from ...distill import Distiller\n"
        "def late():\n"
        "    from crosskd.config import get_args\n"
        "    from crosskd.engine.training import ddp\n"
    )
    known = set(module_names(PACKAGE))
    assert imported_modules(module, "crosskd.engine.deployment.fake", known) == {
        "crosskd.engine.training.trainer", "crosskd.models.heads.base", "crosskd.engine.deployment.checkpoint",
        "crosskd.distill", "crosskd.config", "crosskd.engine.training.ddp",
    }
    graph = {"crosskd.models.fake": imported_modules(module, "crosskd.models.fake", known)}
    assert "crosskd.models.fake imports crosskd.config" in layer_violations(graph)


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .a import A\n")
    (package / "sub" / "a.py").write_text("from pkg.b import B\nA = 1\n")
    (package / "b.py").write_text("B = 2\ndef late():\n    from .sub import a\n")
    assert find_cycles(import_graph(package)) == [["pkg.b", "pkg.sub.a", "pkg.b"]]
    (package / "b.py").write_text("B = 2\n")
    assert find_cycles(import_graph(package)) == []
