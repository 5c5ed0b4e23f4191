"""Dependencies flow one way: cli → engine → distill → models → (losses, assigners) → ops; data serves engine/cli."""

import ast
from pathlib import Path

import crosskd

PACKAGE = Path(crosskd.__file__).parent
SHARED = {"errors", "dist", "utils", "config"}
LOWER = {"ops": set(), "losses": {"ops"}, "assigners": {"ops"}}
LOWER["models"] = {"models", "losses", "assigners", "ops"}
LOWER["distill"] = LOWER["models"] | {"distill"}
LOWER["data"] = {"data"}
LOWER["engine"] = LOWER["distill"] | {"engine", "data"}
LOWER["api"] = LOWER["engine"]
for part in LOWER:
    LOWER[part] = LOWER[part] | {part}


def crosskd_imports(path: Path) -> set[str]:
    """Top-level crosskd subpackages or modules a file imports (absolute imports only, as the project uses)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crosskd."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("crosskd."))
    return names


def test_no_upward_imports():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if part not in LOWER:
            continue
        upward = crosskd_imports(path) - LOWER[part] - SHARED
        violations += [f"{path.relative_to(PACKAGE)} imports crosskd.{name}" for name in sorted(upward)]
    assert violations == []


def test_the_layer_check_sees_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from crosskd.engine.trainer import Trainer\nimport crosskd.models.detector\n")
    assert crosskd_imports(module) == {"engine", "models"}
