"""``list methods`` without importing torch: the registered names and notes, read from the methods' source.

Importing the registry imports every method module (and torch, several CPU-seconds); the command line only
needs each ``@register_method("name")`` and its ``MethodTraits(note=...)``. A class without its own traits
takes its base class's note when that base is registered in the same scan. ``tests/test_cli.py`` checks this
listing equals the registry's, so it cannot drift.
"""

from __future__ import annotations

import ast
from pathlib import Path

METHODS_DIR = Path(__file__).resolve().parents[1] / "methods"


def _registered_name(node: ast.ClassDef) -> str | None:
    for deco in node.decorator_list:
        if (isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "register_method" and deco.args
                and isinstance(deco.args[0], ast.Constant)):
            return deco.args[0].value
    return None


def _own_note(node: ast.ClassDef) -> str | None:
    """The class's ``traits = MethodTraits(note=...)`` note ("" without one), None without own traits."""
    for stmt in node.body:
        if (isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "traits" for t in stmt.targets)
                and isinstance(stmt.value, ast.Call)):
            notes = [k.value for k in stmt.value.keywords if k.arg == "note"]
            return notes[0].value if notes and isinstance(notes[0], ast.Constant) else ""
    return None


def method_notes() -> dict[str, str]:
    """``{registered name: note}`` for every method module, sorted by name."""
    classes: dict[str, tuple[str | None, str | None, list[str]]] = {}  # class -> (name, own note, bases)
    for path in sorted(METHODS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = [getattr(b, "id", getattr(b, "attr", "")) for b in node.bases]
                classes[node.name] = (_registered_name(node), _own_note(node), bases)

    def note_of(cls: str) -> str:
        _, own, bases = classes.get(cls, (None, "", []))
        if own is not None:
            return own
        return next((note_of(b) for b in bases if b in classes), "")

    return dict(sorted((name, note_of(cls)) for cls, (name, _, _) in classes.items() if name))
