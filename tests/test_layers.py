"""The package's layers (issue 15): a pure core that does no I/O and knows no shell, and
the shells around it. Read from the source (imports only), so a new import that breaks
the rule fails here, and a new module must be put in a layer before the suite passes."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bot"

# The rules, with no I/O: command parsing, intents, turn keys, policy, replies, the
# events as data, history, questions, and the live index of intents.
CORE = {
    "commands",
    "intents",
    "turns",
    "policy",
    "replies",
    "events",
    "history",
    "questions",
    "live",
}
# The settings the core reads (dataclasses); loading them (YAML, environment, files) is
# the one part of it that touches the outside, and never calls the core back.
SETTINGS = {"config"}
# What wires the core to the world: Matrix, the lookup API, SQLite, encryption, the
# process, and the use cases that run the core's answers through the store.
SHELLS = {
    "__init__",
    "__main__",
    "api",
    "app",
    "appservice",
    "arrivals",
    "auth",
    "claims",
    "cli",
    "client",
    "crypto",
    "crypto_db",
    "faults",
    "listeners",
    "matrix",
    "metrics",
    "outbox",
    "outcomes",
    "room_events",
    "service",
    "state",
    "store",
}
# The standard library the core may use: computation only (an allow-list, so a new
# import is a decision, not an accident).
CORE_STDLIB = {
    "__future__",
    "collections",
    "dataclasses",
    "datetime",
    "enum",
    "functools",
    "hashlib",
    "html",
    "re",
    "typing",
}


def imports_of(module: str) -> tuple[set[str], set[str]]:
    """(top-level outside modules, sibling modules of the package) `module` imports."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    outside: set[str] = set()
    siblings: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            outside.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                outside.add(node.module.split(".")[0])
            elif node.module:
                siblings.add(node.module.split(".")[0])
            else:  # from . import x, y
                siblings.update(alias.name for alias in node.names)
    return outside, siblings


def test_every_module_is_in_one_layer() -> None:
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    layers = (CORE, SETTINGS, SHELLS)
    assert modules == CORE | SETTINGS | SHELLS, "put a new module in a layer here"
    assert sum(len(layer) for layer in layers) == len(modules), "a module in two layers"


def test_the_core_imports_no_io_library_and_no_shell() -> None:
    for module in sorted(CORE):
        outside, siblings = imports_of(module)
        assert outside <= CORE_STDLIB, f"bot/{module}.py imports {outside - CORE_STDLIB}"
        assert siblings <= CORE | SETTINGS, f"bot/{module}.py imports {siblings - CORE}"


def test_the_settings_call_no_shell() -> None:
    for module in sorted(SETTINGS):
        _, siblings = imports_of(module)
        assert siblings <= CORE, f"bot/{module}.py imports {siblings - CORE}"


def test_the_rule_reads_imports_the_way_they_are_written(tmp_path: Path) -> None:
    """The reader itself: a shell import written either way is found."""
    global PACKAGE
    saved = PACKAGE
    PACKAGE = tmp_path
    try:
        (tmp_path / "probe.py").write_text(
            "import asyncio\nfrom aiohttp import web\nfrom . import store\n"
            "from .matrix import MatrixBot\nfrom .turns import x as y\n",
            encoding="utf-8",
        )
        outside, siblings = imports_of("probe")
    finally:
        PACKAGE = saved
    assert outside == {"asyncio", "aiohttp"}
    assert siblings == {"store", "matrix", "turns"}
