"""registration.yaml, the example registration at the repository's root (SPEC "Parts"):
the keys and values `route-sidecar generate-registration` writes for
config.example.yaml, every key explained by a comment, and tokens that are placeholders
the side-car refuses, from its config file and from the environment."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from route_sidecar.cli import main
from route_sidecar.config import PLACEHOLDER_SECRETS, ConfigError, parse_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "registration.yaml"
CONFIG_EXAMPLE = REPO / "config.example.yaml"
TOKENS = ("as_token", "hs_token")
API_TOKEN = "api-token-" + "t" * 32


def load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    return loaded


def generated(folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What generate-registration writes for config.example.yaml."""
    for name in ("ROUTE_SIDECAR_AS_TOKEN", "ROUTE_SIDECAR_HS_TOKEN", "ROUTE_SIDECAR_API_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    config = folder / "config.yaml"
    config.write_text(CONFIG_EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    output = folder / "registration.yaml"
    assert main(["generate-registration", "-c", str(config), "-o", str(output)]) == 0
    return load(output)


def test_the_example_is_what_generate_registration_writes_but_its_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example, written = load(EXAMPLE), generated(tmp_path, monkeypatch)
    assert list(example) == list(written)  # the same keys, in the same order
    for key in TOKENS:
        assert example[key] in PLACEHOLDER_SECRETS
        assert written[key] not in PLACEHOLDER_SECRETS
    assert {**example, "as_token": None, "hs_token": None} == {
        **written,
        "as_token": None,
        "hs_token": None,
    }


def test_every_key_of_the_example_is_explained_by_a_comment_above_it() -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    key = re.compile(r"^\s*(?:- )?([\w.]+):")
    unexplained = [
        line
        for number, line in enumerate(lines)
        if key.match(line)
        and not lines[number - 1].lstrip().startswith("#")
        # a list item's second key is explained with its first
        and not (
            line.startswith(" ") and key.match(lines[number - 1]) and "- " in lines[number - 1]
        )
    ]
    assert unexplained == []
    assert load(EXAMPLE)["namespaces"]["users"][0].keys() == {"exclusive", "regex"}


def config_with(**appservice: str) -> dict[str, Any]:
    raw = copy.deepcopy(load(CONFIG_EXAMPLE))
    raw["appservice"].update(as_token="as-token-" + "a" * 32, hs_token="hs-token-" + "h" * 32)
    raw["appservice"].update(appservice)
    raw["api"]["tokens"] = [API_TOKEN]
    return raw


@pytest.mark.parametrize("key", TOKENS)
def test_the_side_car_refuses_the_examples_tokens_from_its_config(key: str) -> None:
    parse_config(config_with(), {})  # real tokens pass
    with pytest.raises(ConfigError) as refused:
        parse_config(config_with(**{key: load(EXAMPLE)[key]}), {})
    assert refused.value.key == f"appservice.{key}"
    assert load(EXAMPLE)[key] not in str(refused.value)


@pytest.mark.parametrize("key", TOKENS)
def test_the_side_car_refuses_the_examples_tokens_from_the_environment(key: str) -> None:
    env = {f"ROUTE_SIDECAR_{key.upper()}": load(EXAMPLE)[key]}
    with pytest.raises(ConfigError) as refused:
        parse_config(config_with(), env)
    assert refused.value.key == f"appservice.{key}"
