"""The package's layers (issue 15): `route_sidecar.core` does no I/O and knows no shell;
the shells (`route_sidecar.*`) wire it to Matrix, HTTP, SQLite and the process. Read
from the source (imports only), so a new import that breaks the rule fails here, and a
new top-level module must be put in a layer before the suite passes."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "route_sidecar"
CORE_DIR = PACKAGE / "core"

# The settings the core reads (dataclasses); loading them (YAML, environment, files) is
# the one part of it that touches the outside, and it never calls a shell.
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
    "descriptions",
    "faults",
    "healthcheck",
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
# Subpackages beside `core`: the database's records (a shell: SQLite rows), and the
# migrations (`.sql` files, no code).
SHELL_PACKAGES = {"records"}
DATA_PACKAGES = {"migrations"}
# The standard library the core may use: computation only (an allow-list, so a new
# import is a decision, not an accident).
CORE_STDLIB = {
    "__future__",
    "base64",  # MSC4391's state key
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


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(top-level outside modules, package modules as `core.x` or `x`) a file imports.
    Relative imports are read from where the file is (`core/` or the package)."""
    in_core = path.parent.name == "core"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    outside: set[str] = set()
    inside: set[str] = set()

    def named(level: int, module: str) -> str:
        base = "core" if in_core and level == 1 else ""
        return f"{base}.{module}".strip(".")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            outside.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                top = node.module.split(".")[0]
                if top == "route_sidecar":
                    rest = node.module.split(".")[1:]
                    inside.add(".".join(rest[:2] if rest[:1] == ["core"] else rest[:1]))
                else:
                    outside.add(top)
            elif node.module:
                inside.add(named(node.level, ".".join(node.module.split(".")[:2])))
            else:  # from . import x, y
                inside.update(named(node.level, alias.name) for alias in node.names)
    return outside, inside


def core_modules() -> list[Path]:
    return sorted(p for p in CORE_DIR.glob("*.py") if p.stem != "__init__")


def test_every_module_is_in_one_layer() -> None:
    top = {path.stem for path in PACKAGE.glob("*.py")}
    assert top == SETTINGS | SHELLS, "put a new module in a layer here (or in core/)"
    assert not SETTINGS & SHELLS
    assert len(core_modules()) >= 9
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert packages == {"core"} | SHELL_PACKAGES | DATA_PACKAGES, "put a new package in a layer"
    migrations = [path.name for path in (PACKAGE / "migrations").glob("*.py")]
    assert migrations == ["__init__.py"], "the migrations are SQL, not code"


def test_the_core_imports_no_io_library_and_no_shell() -> None:
    allowed = {f"core.{p.stem}" for p in core_modules()} | SETTINGS
    for path in core_modules():
        outside, inside = imports_of(path)
        assert outside <= CORE_STDLIB, f"core/{path.name} imports {outside - CORE_STDLIB}"
        assert inside <= allowed, f"core/{path.name} imports {inside - allowed}"


def test_the_records_know_no_use_case_and_no_other_shell() -> None:
    """The records turn rows into the core's values and back; the one shell they know is
    the outbox's row types."""
    allowed = {"core.commands", "core.history", "core.intents", "core.turns", "outbox"}
    for path in sorted((PACKAGE / "records").glob("*.py")):
        _, inside = imports_of(path)
        inside = {name for name in inside if not name.startswith(("rows", "records"))}
        assert inside <= allowed, f"records/{path.name} imports {inside - allowed}"


def test_the_settings_call_no_shell() -> None:
    core = {f"core.{p.stem}" for p in core_modules()}
    for module in sorted(SETTINGS):
        _, inside = imports_of(PACKAGE / f"{module}.py")
        assert inside <= core, f"{module}.py imports {inside - core}"


def test_the_rule_reads_imports_the_way_they_are_written(tmp_path: Path) -> None:
    """The reader itself: shell imports written every way are found, from core/."""
    (tmp_path / "core").mkdir()
    probe = tmp_path / "core" / "probe.py"
    probe.write_text(
        "import asyncio\nfrom aiohttp import web\nfrom .. import store\n"
        "from ..matrix import MatrixBot\nfrom .turns import x as y\nfrom . import intents\n"
        "from route_sidecar.api import LookupApi\nfrom route_sidecar.core.policy import z\n",
        encoding="utf-8",
    )
    outside, inside = imports_of(probe)
    assert outside == {"asyncio", "aiohttp"}
    assert inside == {"store", "matrix", "core.turns", "core.intents", "api", "core.policy"}
