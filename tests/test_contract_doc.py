"""docs/contract.md, the product contract, kept honest where a machine can check it: it
names every endpoint of the lookup API (route_sidecar/openapi.json, with its method),
every metadata key and claim reason the API answers with, and every word the command
parser accepts (taken from route_sidecar/core/commands.py itself, not listed here)."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from route_sidecar.core import commands

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ROOT / "docs" / "contract.md"
OPENAPI = ROOT / "route_sidecar" / "openapi.json"
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")


def contract() -> str:
    return CONTRACT.read_text(encoding="utf-8")


def openapi() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(OPENAPI.read_text(encoding="utf-8"))
    return document


def code_words() -> set[str]:
    """Every whitespace-separated word inside the contract's `code spans`."""
    return {word for span in _CODE_SPAN.findall(contract()) for word in span.split()}


def command_words() -> set[str]:
    """The words the parser accepts, from its own constants: the prefixes, the command
    words (those that can never be targets), the raw-model prefix, and the options of
    each scope as the parser's canonical form writes them."""
    words = {*commands.DEFAULT_PREFIXES, *commands.RESERVED_WORDS, commands.RAW_MODEL_PREFIX}
    scopes = (commands.Scope.next_turns(2), commands.Scope.lasting(timedelta(hours=1)))
    for scope in scopes:
        line = commands.format_command(commands.RouteTo(target="cloud", scope=scope))
        words.update(word for word in line.split() if word.startswith("--"))
    return words


def test_every_endpoint_of_the_api_is_in_the_contract() -> None:
    text = contract()
    endpoints = [
        f"{method.upper()} {path}"
        for path, operations in openapi()["paths"].items()
        for method in operations
        if method in HTTP_METHODS
    ]
    assert endpoints
    assert [endpoint for endpoint in endpoints if endpoint not in text] == []


def test_every_metadata_key_is_in_the_contract() -> None:
    text = contract()
    keys = list(openapi()["components"]["schemas"]["ClaimMetadata"]["properties"])
    assert "matrix_sender" in keys
    assert [key for key in keys if f"`{key}`" not in text] == []


def test_every_claim_reason_is_in_the_contract() -> None:
    text = contract()
    reasons = openapi()["components"]["schemas"]["ClaimReason"]["enum"]
    assert [reason for reason in reasons if f"`{reason}`" not in text] == []


def test_every_command_word_the_parser_accepts_is_in_the_contract() -> None:
    words = command_words()
    assert {"--turns", "--for", "again", "auto"} <= words  # the constants were read
    shown = code_words()
    missing = [
        word
        for word in sorted(words)
        if word not in shown and not any(s.startswith(word) for s in shown if word.endswith(":"))
    ]
    assert missing == []
