"""The package's layers (docs/architecture.md, "Layers"): no module imports a higher layer, and no headless module Qt.

Every module is parsed with ``ast`` (nothing is imported, so this runs in well under a second): every import
statement counts, at the top of a module, inside a function or under ``TYPE_CHECKING``, relative or absolute.
"""

from __future__ import annotations

import ast
import importlib.util
from collections import deque
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "napari_mpt_deblur"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("config", ("_version", "config")),
    ("io", ("atomic", "images", "runtime")),
    ("normalisation", ("normalization", "data")),
    ("models", ("models",)),
    ("losses", ("losses",)),
    ("inference", ("tiling", "inference")),
    ("training", ("training",)),
    ("detection", ("detection",)),
    ("interfaces", ("plugin", "cli", "")),  # "": the package root, which re-exports the public API
)
"""The one table of layers, lowest first: a module may import its own layer and the layers before it.
Each entry names modules or subpackages relative to the package."""

HEADLESS_INTERFACES = ("cli", "")
"""Modules of the top layer that must work without Qt too: the command line and the package root."""

GUI_MODULES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "magicgui", "napari")
"""Top-level names of Qt bindings and of the GUI libraries built on them, which headless code must not import."""


@dataclass(frozen=True)
class Import:
    """One import statement's target, where it is written."""

    module: str
    """The importing module, e.g. ``napari_mpt_deblur.models.files``."""
    line: int
    target: str
    """The imported module, e.g. ``napari_mpt_deblur.config`` or ``qtpy.QtWidgets``."""


def package_dir() -> Path:
    """The package's folder, found without importing it (importing would load torch)."""
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.submodule_search_locations, f"{PACKAGE} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its ``__init__.py``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((PACKAGE, *parts))] = path
    return modules


def imports_in(source: str, module: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every module that ``source`` (the text of ``module``) imports, anywhere in it.

    A ``from X import name`` counts as importing ``X.name`` when that is a module of the package,
    else ``X``; a module of the package that is not known resolves to its closest known parent.
    """
    here = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]  # names may be submodules
        else:
            continue
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
            found.append(Import(module, node.lineno, target))
    return found


def layer_of(module: str) -> int | None:
    """The index in :data:`LAYERS` of a module of the package, by its longest matching entry; None if unlisted."""
    relative = module.removeprefix(PACKAGE).removeprefix(".")
    best: tuple[int, int] | None = None  # (length of the entry, layer)
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if relative == entry or (entry and relative.startswith(entry + ".")):
                if best is None or len(entry) > best[0]:
                    best = (len(entry), index)
    return None if best is None else best[1]


def all_imports() -> tuple[dict[str, Path], list[Import]]:
    root = package_dir()
    modules = module_files(root)
    known = set(modules)
    found = []
    for module, path in modules.items():
        found += imports_in(path.read_text(encoding="utf-8"), module, path.name == "__init__.py", known)
    return modules, found


def is_gui(target: str) -> bool:
    parts = target.split(".")
    return parts[0] in GUI_MODULES or any(part.startswith("backend_qt") for part in parts)  # matplotlib's Qt canvas


def is_headless(module: str) -> bool:
    relative = module.removeprefix(PACKAGE).removeprefix(".")
    return layer_of(module) != len(LAYERS) - 1 or relative in HEADLESS_INTERFACES


def where(modules: dict[str, Path], item: Import) -> str:
    path = modules[item.module].relative_to(package_dir().parent).as_posix()
    return f"{path}:{item.line}"


def test_the_import_parser_sees_relative_absolute_and_nested_imports():
    source = """
import numpy as np
from . import files
from .. import images
from ..config import ConfigError
import napari_mpt_deblur.inference

def later():
    from qtpy.QtWidgets import QWidget
"""
    known = {PACKAGE, f"{PACKAGE}.models", f"{PACKAGE}.models.files", f"{PACKAGE}.images", f"{PACKAGE}.config"}
    known.add(f"{PACKAGE}.inference")
    found = imports_in(source, f"{PACKAGE}.models.mpt", False, known)
    targets = {(item.target, item.line) for item in found}
    assert (f"{PACKAGE}.models.files", 3) in targets
    assert (f"{PACKAGE}.images", 4) in targets
    assert (f"{PACKAGE}.config", 5) in targets
    assert (f"{PACKAGE}.inference", 6) in targets
    assert ("qtpy.QtWidgets", 9) in targets
    assert layer_of(f"{PACKAGE}.models.mpt") < layer_of(f"{PACKAGE}.inference")
    assert layer_of(PACKAGE) == layer_of(f"{PACKAGE}.cli") == len(LAYERS) - 1


def test_every_module_has_a_layer():
    modules, _ = all_imports()
    unlisted = sorted(module for module in modules if layer_of(module) is None)
    assert not unlisted, f"modules missing from LAYERS in {__name__} (and docs/architecture.md): {unlisted}"


def test_no_module_imports_a_higher_layer():
    modules, found = all_imports()
    assert len(found) > 100, "the parser found too few imports to be reading the package"
    upward = []
    for item in found:
        if item.target not in modules:
            continue
        source, target = layer_of(item.module), layer_of(item.target)
        if source is not None and target is not None and target > source:
            upward.append(
                f"{where(modules, item)}: {item.module} (layer {LAYERS[source][0]}) imports "
                f"{item.target} (layer {LAYERS[target][0]})"
            )
    assert not upward, "imports that climb to a higher layer:\n" + "\n".join(upward)


def test_headless_modules_never_import_qt():
    """Neither directly nor through another module of the package (its parent packages included)."""
    modules, found = all_imports()
    gui = {}  # module -> its first GUI import
    edges: dict[str, set[str]] = {module: set() for module in modules}
    for item in found:
        if is_gui(item.target):
            gui.setdefault(item.module, item)
        elif item.target in modules and item.target != item.module:
            edges[item.module].add(item.target)
    for module in modules:  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        parent = module.rpartition(".")[0]
        while parent.startswith(PACKAGE):
            edges[module].add(parent)
            parent = parent.rpartition(".")[0]
    problems = []
    for start in sorted(filter(is_headless, modules)):
        came_from: dict[str, str | None] = {start: None}
        queue = deque([start])
        while queue:
            module = queue.popleft()
            if module in gui:
                chain = [module]
                while came_from[chain[-1]] is not None:
                    chain.append(came_from[chain[-1]])
                item = gui[module]
                problems.append(
                    f"{where(modules, item)}: {item.module} imports {item.target}, "
                    f"reached from headless {' <- '.join(chain)}"
                )
                break
            for target in sorted(edges[module] - came_from.keys()):
                came_from[target] = module
                queue.append(target)
    assert not problems, "headless modules that import Qt:\n" + "\n".join(problems)
