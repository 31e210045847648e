"""The house rules the linters do not check: no module imports another module's underscore name (import-linter
checks the layers and cycles, ruff the rest; both run in make test)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "palmchat"


def private_imports(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("palmchat")):
                found += [f"{path.relative_to(root.parent)}:{node.lineno}: {alias.name} from {node.module}"
                          for alias in node.names if alias.name.startswith("_")]
    return found


def test_no_module_imports_another_modules_underscore_name():
    assert private_imports(PACKAGE) == []


def test_the_check_finds_one(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("from palmchat.feedback.round import _base_of\n")
    assert private_imports(tmp_path / "pkg") == ["pkg/a.py:1: _base_of from palmchat.feedback.round"]
