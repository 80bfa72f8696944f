"""The layout's import rule (README, Architecture): only napari_tae/plugin imports napari or Qt.

The core (napari_tae outside plugin/, models included) and training/ never import napari, Qt or
the plugin folder; the core and the plugin never import training. One seam is allowed: the
``napari-tae demo`` subcommand hands over to the plugin inside its function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUI_ROOTS = {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "magicgui", "vispy"}
#: (module, imported module): the demo subcommand starts the plugin's demo
ALLOWED = {("napari_tae.cli", "napari_tae.plugin._demo")}


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path, root).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _violations(files: list[Path], forbidden, root: Path = ROOT) -> list[str]:
    out = []
    for path in files:
        name = _module_name(path, root)
        for module in sorted(_imports(path, root)):
            allowed = any(name == a and (module == b or module.startswith(f"{b}."))
                          for a, b in ALLOWED)
            if forbidden(module) and not allowed:
                out.append(f"{name} imports {module}")
    return out


def _is_gui(module: str) -> bool:
    return module.split(".")[0] in GUI_ROOTS


def _is_plugin(module: str) -> bool:
    return module == "napari_tae.plugin" or module.startswith("napari_tae.plugin.")


def _is_training(module: str) -> bool:
    return module.split(".")[0] == "training"


def test_core_imports_neither_napari_nor_qt_nor_the_plugin():
    core = [p for p in _files("napari_tae") if "plugin" not in p.relative_to(ROOT).parts]
    assert core, "no core modules found"
    assert _violations(core, lambda m: _is_gui(m) or _is_plugin(m) or _is_training(m)) == []


def test_training_imports_only_the_core():
    assert _violations(_files("training"), lambda m: _is_gui(m) or _is_plugin(m)) == []


def test_plugin_never_imports_training():
    assert _violations(_files("napari_tae/plugin"), _is_training) == []


def test_the_check_sees_a_violation(tmp_path):
    # the scanner itself: a function-level import of napari and a relative import of the plugin
    bad = tmp_path / "napari_tae" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("def f():\n    import napari.layers\n    from .plugin import _widget\n")
    found = _violations([bad], lambda m: _is_gui(m) or _is_plugin(m), root=tmp_path)
    assert found == ["napari_tae.bad imports napari.layers",
                     "napari_tae.bad imports napari_tae.plugin",
                     "napari_tae.bad imports napari_tae.plugin._widget"]


@pytest.mark.parametrize("command", [["models"], ["segment", "--help"]])
def test_headless_commands_load_no_gui(command):
    # at run time too: the headless CLI and every core module leave napari and Qt unloaded
    code = (
        "import sys, contextlib, io, importlib, pkgutil\n"
        "import napari_tae, napari_tae.models\n"
        "for m in pkgutil.walk_packages(napari_tae.__path__, 'napari_tae.'):\n"
        "    if not m.name.startswith('napari_tae.plugin'):\n"
        "        importlib.import_module(m.name)\n"
        "from napari_tae.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        main({command!r})\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"gui = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(GUI_ROOTS)!r})\n"
        "print(gui)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
