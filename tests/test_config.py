"""SPEC "Configuration": one YAML file, documented by config.example.yaml; a bad config
stops the program with one line naming the key and the problem."""

from __future__ import annotations

import copy
import functools
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from route_sidecar.config import SECRET_ENV, Config, ConfigError, load_config, parse_config
from route_sidecar.core.commands import DEFAULT_PREFIXES, RESERVED_WORDS

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.yaml"
CLI = Path(sys.executable).parent / "route-sidecar"
AS_TOKEN = "as-token-" + "a" * 32
HS_TOKEN = "hs-token-" + "h" * 32
API_TOKEN = "api-token-" + "t" * 32
TOKEN_ENV = {
    "ROUTE_SIDECAR_AS_TOKEN": AS_TOKEN,
    "ROUTE_SIDECAR_HS_TOKEN": HS_TOKEN,
    "ROUTE_SIDECAR_API_TOKENS": API_TOKEN,
}


@functools.cache
def example_file() -> dict[str, Any]:
    loaded: dict[str, Any] = YAML(typ="safe", pure=True).load(EXAMPLE.read_text(encoding="utf-8"))
    return loaded


def example() -> dict[str, Any]:
    """The example file as a plain mapping, with real tokens in it."""
    raw = copy.deepcopy(example_file())
    raw["appservice"]["as_token"] = AS_TOKEN
    raw["appservice"]["hs_token"] = HS_TOKEN
    raw["api"]["tokens"] = [API_TOKEN]
    return raw


def error_of(raw: Any, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, environ or {})
    return caught.value


def leaves(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Dotted paths of every value in the file that is not itself a section."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaves(value, (*path, str(key)))
    elif path:
        yield path


def set_path(raw: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return raw


def delete_path(raw: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    node = raw
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]
    return raw


def dump(raw: dict[str, Any], path: Path) -> Path:
    stream = StringIO()
    YAML(typ="safe", pure=True).dump(raw, stream)
    path.write_text(stream.getvalue(), encoding="utf-8")
    return path


# --- the example file --------------------------------------------------------------------


def test_example_parses_with_secrets_from_the_environment() -> None:
    raw = YAML(typ="safe", pure=True).load(EXAMPLE.read_text(encoding="utf-8"))
    config = parse_config(raw, TOKEN_ENV)
    assert config.homeserver.domain == "example.org"
    assert config.bot_user_id == "@route:example.org"
    assert config.appservice.as_token == AS_TOKEN
    assert config.appservice.hs_token == HS_TOKEN
    assert config.api.tokens == (API_TOKEN,)
    assert set(config.targets) == {"cloud", "local"}
    assert config.targets["cloud"].aliases == ("c", "remote")
    assert config.routing.intent_ttl == timedelta(minutes=15)
    assert config.routing.turn_idle == timedelta(minutes=5)
    assert config.routing.prefixes == DEFAULT_PREFIXES
    assert config.permissions == {"*": 0}
    assert config.routes_per_hour == 30


def test_example_file_loads_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    config = load_config(path, environ=TOKEN_ENV)
    assert config.path == path
    assert config.database_path == tmp_path / "route-sidecar.db"


@pytest.mark.parametrize(
    ("given", "written", "expected", "misplaced"),
    [
        # The README's deploy: `-c config.yaml` in the side-car's folder.
        ("config.yaml", "route-sidecar.db", "route-sidecar.db", ["/route-sidecar.db"]),
        # `-c sub/config.yaml` from the folder above.
        (
            "sub/config.yaml",
            "route-sidecar.db",
            "sub/route-sidecar.db",
            ["/route-sidecar.db", "/sub/route-sidecar.db"],
        ),
        ("./sub/../config.yaml", "data/x.db", "data/x.db", ["/data/x.db"]),
        ("../up/config.yaml", "x.db", "../up/x.db", ["/up/x.db", "/x.db"]),
        # An absolute config path or database path was never misplaced.
        ("{tmp}/config.yaml", "x.db", "x.db", ["/x.db"]),
        ("config.yaml", "{tmp}/abs.db", "abs.db", []),
    ],
)
def test_every_path_is_absolute_once_loaded_and_earlier_misplacements_are_known(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    given: str,
    written: str,
    expected: str,
    misplaced: list[str],
) -> None:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (tmp_path / "up").mkdir()
    monkeypatch.chdir(work)
    config_path = Path(given.format(tmp=work))
    raw = YAML(typ="safe", pure=True).load(EXAMPLE.read_text(encoding="utf-8"))
    raw["database"] = "sqlite:///" + written.format(tmp=work)
    config_path.write_text(YAML_dump(raw), encoding="utf-8")
    config = load_config(config_path, environ=TOKEN_ENV)
    assert config.database_path.is_absolute()
    assert config.database_path == Path(os.path.abspath(work / expected))
    assert config.path == Path(os.path.abspath(config_path))
    assert [str(p) for p in config.misplaced_crypto_stores] == misplaced


def test_a_config_without_a_file_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    raw = YAML(typ="safe", pure=True).load(EXAMPLE.read_text(encoding="utf-8"))
    config = parse_config(raw, TOKEN_ENV)
    assert config.database_path == tmp_path / "route-sidecar.db"
    assert config.path is None


def YAML_dump(raw: Any) -> str:
    out = StringIO()
    YAML().dump(raw, out)
    return out.getvalue()


def test_example_without_tokens_is_refused_naming_the_token() -> None:
    raw = YAML(typ="safe", pure=True).load(EXAMPLE.read_text(encoding="utf-8"))
    error = error_of(raw, {})
    assert error.key == "appservice.as_token"
    assert "ROUTE_SIDECAR_AS_TOKEN" in str(error)


EXAMPLE_LEAVES = list(leaves(example()))


def test_example_documents_every_section() -> None:
    sections = {path[0] for path in EXAMPLE_LEAVES}
    assert sections == {
        "homeserver",
        "appservice",
        "api",
        "database",
        "targets",
        "routing",
        "permissions",
        "rooms",
        "agents",
        "limits",
        "logging",
        "encryption",
    }


@pytest.mark.parametrize("path", EXAMPLE_LEAVES, ids=[".".join(p) for p in EXAMPLE_LEAVES])
def test_every_documented_key_is_read_and_named_in_its_error(path: tuple[str, ...]) -> None:
    # A key the reader did not know would be silently accepted with any value.
    error = error_of(set_path(example(), path, {"not": "valid"}))
    assert error.key == ".".join(path)


COMMENTED_OUT = [
    ('  # "example.org": 10', '  "example.org": 10'),
    ('  # "@admin:example.org": 100', '  "@admin:example.org": 100'),
    (
        'rooms: []\n#  - "!abcdefghijklmnop:example.org"',
        'rooms:\n  - "!abcdefghijklmnop:example.org"',
    ),
    ('agents: []\n#  - "@hermes:example.org"', 'agents:\n  - "@hermes:example.org"'),
]


def test_commented_out_examples_are_valid_when_uncommented() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for commented, uncommented in COMMENTED_OUT:
        assert commented in text
        text = text.replace(commented, uncommented)
    config = parse_config(YAML(typ="safe", pure=True).load(text), TOKEN_ENV)
    assert config.permissions == {"*": 0, "example.org": 10, "@admin:example.org": 100}
    assert config.rooms == {"!abcdefghijklmnop:example.org"}
    assert config.agents == {"@hermes:example.org"}


def test_minimal_config_takes_the_documented_defaults() -> None:
    raw = {
        "homeserver": {"address": "http://127.0.0.1:8008", "domain": "example.org"},
        "appservice": {"address": "http://127.0.0.1:29333"},
        "database": "sqlite:///data.db",
        "targets": {"cloud": {"model": "ollama-cloud/glm-5.1"}},
    }
    config = parse_config(raw, TOKEN_ENV)
    full = parse_config(example(), {})
    assert config.appservice.listen == full.appservice.listen
    assert config.api.listen == full.api.listen
    assert config.api.max_body_bytes == full.api.max_body_bytes
    assert config.routing == full.routing
    assert config.routes_per_hour == full.routes_per_hour
    assert config.log_level == full.log_level
    assert config.permissions == {}
    assert config.rooms == frozenset() and config.agents == frozenset()
    assert config.targets["cloud"].level == 0


# --- errors name the key -----------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], dict[str, Any]]

ERRORS: list[tuple[str, Mutation, str]] = [
    ("missing domain", lambda r: delete_path(r, ("homeserver", "domain")), "homeserver.domain"),
    ("missing section", lambda r: delete_path(r, ("homeserver",)), "homeserver.domain"),
    ("section not a mapping", lambda r: set_path(r, ("homeserver",), "x"), "homeserver"),
    ("empty domain", lambda r: set_path(r, ("homeserver", "domain"), " "), "homeserver.domain"),
    (
        "address not a URL",
        lambda r: set_path(r, ("homeserver", "address"), "localhost:8008"),
        "homeserver.address",
    ),
    (
        "ftp address",
        lambda r: set_path(r, ("appservice", "address"), "ftp://h"),
        "appservice.address",
    ),
    (
        "body limit not a number",
        lambda r: set_path(r, ("api", "max_body_bytes"), "x"),
        "api.max_body_bytes",
    ),
    (
        "body limit a boolean",
        lambda r: set_path(r, ("api", "max_body_bytes"), True),
        "api.max_body_bytes",
    ),
    (
        "body limit too small",
        lambda r: set_path(r, ("api", "max_body_bytes"), 10),
        "api.max_body_bytes",
    ),
    ("port too large", lambda r: set_path(r, ("api", "listen", "port"), 70000), "api.listen.port"),
    (
        "port zero",
        lambda r: set_path(r, ("appservice", "listen", "port"), 0),
        "appservice.listen.port",
    ),
    (
        "bad localpart",
        lambda r: set_path(r, ("appservice", "bot_localpart"), "Route Bot"),
        "appservice.bot_localpart",
    ),
    ("unknown section", lambda r: set_path(r, ("extras",), {"a": 1}), "extras"),
    (
        "unknown key in a section",
        lambda r: set_path(r, ("homeserver", "port"), 8008),
        "homeserver.port",
    ),
    (
        "misspelt key",
        lambda r: set_path(r, ("limits", "routes_per_hours"), 5),
        "limits.routes_per_hours",
    ),
    (
        "unknown key in raw_models",
        lambda r: set_path(r, ("routing", "raw_models", "alowed"), True),
        "routing.raw_models.alowed",
    ),
    (
        "unknown key in a listener",
        lambda r: set_path(r, ("api", "listen", "adress"), "0.0.0.0"),
        "api.listen.adress",
    ),
    (
        "unknown key in the appservice listener",
        lambda r: set_path(r, ("appservice", "listen", "hots"), "0.0.0.0"),
        "appservice.listen.hots",
    ),
    (
        "unknown key in a target",
        lambda r: set_path(r, ("targets", "cloud", "modle"), "x"),
        "targets.cloud.modle",
    ),
    (
        "target without model",
        lambda r: delete_path(r, ("targets", "cloud", "model")),
        "targets.cloud.model",
    ),
    ("no targets", lambda r: set_path(r, ("targets",), {}), "targets"),
    (
        "target named status",
        lambda r: set_path(r, ("targets", "status"), {"model": "m"}),
        "targets.status",
    ),
    (
        "target named again",
        lambda r: set_path(r, ("targets", "again"), {"model": "m"}),
        "targets.again",
    ),
    (
        "alias is a command word",
        lambda r: set_path(r, ("targets", "cloud", "aliases"), ["help"]),
        "targets.cloud",
    ),
    (
        "target name with capitals",
        lambda r: set_path(r, ("targets", "Big"), {"model": "m"}),
        "targets.Big",
    ),
    (
        "target not a mapping",
        lambda r: set_path(r, ("targets", "big"), "ollama/big"),
        "targets.big",
    ),
    (
        "alias with a space",
        lambda r: set_path(r, ("targets", "local", "aliases"), ["my model"]),
        "targets.local.aliases",
    ),
    (
        "duplicate alias across targets",
        lambda r: set_path(r, ("targets", "local", "aliases"), ["c"]),
        "targets.local",
    ),
    (
        "alias naming another target",
        lambda r: set_path(r, ("targets", "local", "aliases"), ["cloud"]),
        "targets.local",
    ),
    (
        "negative target level",
        lambda r: set_path(r, ("targets", "cloud", "level"), -1),
        "targets.cloud.level",
    ),
    (
        "bad duration",
        lambda r: set_path(r, ("routing", "intent_ttl"), "15 minutes"),
        "routing.intent_ttl",
    ),
    ("zero duration", lambda r: set_path(r, ("routing", "turn_idle"), "0m"), "routing.turn_idle"),
    (
        "negative seconds",
        lambda r: set_path(r, ("routing", "max_duration"), -5),
        "routing.max_duration",
    ),
    (
        "boolean duration",
        lambda r: set_path(r, ("routing", "intent_ttl"), True),
        "routing.intent_ttl",
    ),
    ("empty prefixes", lambda r: set_path(r, ("routing", "prefixes"), []), "routing.prefixes"),
    (
        "prefix with a space",
        lambda r: set_path(r, ("routing", "prefixes"), ["/route it"]),
        "routing.prefixes",
    ),
    (
        "bad raw model pattern",
        lambda r: set_path(r, ("routing", "raw_models", "patterns"), ["("]),
        "routing.raw_models.patterns[0]",
    ),
    ("max_turns zero", lambda r: set_path(r, ("routing", "max_turns"), 0), "routing.max_turns"),
    (
        "negative permission",
        lambda r: set_path(r, ("permissions", "@a:example.org"), -1),
        "permissions.@a:example.org",
    ),
    ("room without !", lambda r: set_path(r, ("rooms",), ["abc:example.org"]), "rooms"),
    ("agent without @", lambda r: set_path(r, ("agents",), ["hermes:example.org"]), "agents"),
    (
        "negative rate limit",
        lambda r: set_path(r, ("limits", "routes_per_hour"), -1),
        "limits.routes_per_hour",
    ),
    ("unknown log level", lambda r: set_path(r, ("logging", "level"), "LOUD"), "logging.level"),
    ("database not sqlite", lambda r: set_path(r, ("database",), "postgres://db"), "database"),
    ("database without path", lambda r: set_path(r, ("database",), "sqlite:///"), "database"),
    (
        "short as_token",
        lambda r: set_path(r, ("appservice", "as_token"), "short"),
        "appservice.as_token",
    ),
    (
        "short hs_token",
        lambda r: set_path(r, ("appservice", "hs_token"), "x" * 15),
        "appservice.hs_token",
    ),
    (
        "short api token",
        lambda r: set_path(r, ("api", "tokens"), [API_TOKEN, "short"]),
        "api.tokens",
    ),
    ("no api token", lambda r: set_path(r, ("api", "tokens"), []), "api.tokens"),
    ("api tokens not a list", lambda r: set_path(r, ("api", "tokens"), API_TOKEN), "api.tokens"),
]


@pytest.mark.parametrize(("case", "mutate", "key"), ERRORS, ids=[c for c, _, _ in ERRORS])
def test_config_error_names_the_key(case: str, mutate: Mutation, key: str) -> None:
    error = error_of(mutate(example()))
    assert error.key == key, f"{case}: {error}"
    assert str(error).startswith(f"{key}: ")
    assert "\n" not in str(error)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([(), ("permissions",), ("targets",), ("homeserver",)]),
    st.tuples(
        st.text(max_size=10),
        st.sampled_from(["\n", "\r", "\u2028", "\x85", "\x1c"]),
        st.text(max_size=10),
    ).map("".join),
)
def test_config_error_is_one_line_whatever_the_key(where: tuple[str, ...], name: str) -> None:
    raw = example()
    value: Any = {"model": "m"} if where == ("targets",) else -1
    error = error_of(set_path(raw, (*where, name), value))
    assert len(str(error).splitlines()) == 1, str(error)


def test_duplicate_alias_error_names_both_targets() -> None:
    error = error_of(set_path(example(), ("targets", "local", "aliases"), ["c"]))
    assert "'c'" in error.problem and "'cloud'" in error.problem


@pytest.mark.parametrize("word", sorted(RESERVED_WORDS))
def test_no_command_word_can_name_a_target(word: str) -> None:
    assert error_of(set_path(example(), ("targets", word), {"model": "m"})).key == f"targets.{word}"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("90s", timedelta(seconds=90)), ("1h30m", timedelta(minutes=90)), (120, timedelta(minutes=2))],
)
def test_durations_are_read_in_words_or_seconds(value: Any, expected: timedelta) -> None:
    config = parse_config(set_path(example(), ("routing", "turn_idle"), value), {})
    assert config.routing.turn_idle == expected


# --- routing.failure_grace (SPEC "Retry") ------------------------------------------------


def test_failure_grace_is_documented_in_the_example_and_parses() -> None:
    assert "failure_grace" in example_file()["routing"]
    config = parse_config(example(), {})
    assert config.routing.failure_grace == timedelta(seconds=15)


def test_failure_grace_defaults_to_15_seconds() -> None:
    config = parse_config(delete_path(example(), ("routing", "failure_grace")), {})
    assert config.routing.failure_grace == timedelta(seconds=15)
    empty = parse_config(set_path(example(), ("routing", "failure_grace"), None), {})
    assert empty.routing.failure_grace == timedelta(seconds=15)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("2m", timedelta(minutes=2)),
        ("1m5s", timedelta(seconds=65)),
        (8, timedelta(seconds=8)),
    ],
)
def test_failure_grace_is_a_duration(value: Any, expected: timedelta) -> None:
    config = parse_config(set_path(example(), ("routing", "failure_grace"), value), {})
    assert config.routing.failure_grace == expected


@pytest.mark.parametrize(
    "value", ["soon", "15 seconds", "0s", 0, -5, True, 1.5, [], {"seconds": 15}]
)
def test_bad_failure_grace_is_refused_naming_the_key(value: Any) -> None:
    error = error_of(set_path(example(), ("routing", "failure_grace"), value))
    assert error.key == "routing.failure_grace"
    assert str(error).startswith("routing.failure_grace: ")
    assert "\n" not in str(error)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read config file") as caught:
        load_config(missing, environ=TOKEN_ENV)
    assert str(missing) in str(caught.value)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path, environ=TOKEN_ENV)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("homeserver: [unclosed\n", "is not valid YAML at line"),
        ("homeserver:\n  domain: a\n   address: b\n", "is not valid YAML"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("", "must hold a mapping"),
    ],
    ids=["unclosed", "bad-indent", "list", "empty"],
)
def test_invalid_yaml_is_a_config_error(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=problem):
        load_config(path, environ=TOKEN_ENV)


def test_secrets_from_the_environment_win_over_the_file() -> None:
    env = {
        "ROUTE_SIDECAR_AS_TOKEN": "env-as-" + "x" * 20,
        "ROUTE_SIDECAR_HS_TOKEN": "env-hs-" + "y" * 20,
        "ROUTE_SIDECAR_API_TOKENS": " env-api-1-" + "z" * 16 + " , env-api-2-" + "w" * 16 + ",",
    }
    config = parse_config(example(), env)
    assert config.appservice.as_token == env["ROUTE_SIDECAR_AS_TOKEN"]
    assert config.appservice.hs_token == env["ROUTE_SIDECAR_HS_TOKEN"]
    assert config.api.tokens == ("env-api-1-" + "z" * 16, "env-api-2-" + "w" * 16)


def test_short_token_from_the_environment_is_refused() -> None:
    error = error_of(example(), {"ROUTE_SIDECAR_API_TOKENS": "short"})
    assert error.key == "api.tokens"


def test_secret_env_names_are_the_documented_ones() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for name in SECRET_ENV.values():
        assert name in text


def test_config_is_a_typed_value() -> None:
    config = parse_config(example(), {})
    assert isinstance(config, Config)
    assert config.routing.raw_models.allowed is False
    assert config.targets["local"].model == "glm-4.7-flash:q4_K_M"


# --- the command line --------------------------------------------------------------------


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTE_SIDECAR_")}
    return subprocess.run(
        [str(CLI), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
    )


def example_copy(tmp_path: Path, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    return path


CLI_ERRORS = [
    e
    for e in ERRORS
    if e[0]
    in {
        "missing domain",
        "body limit not a number",
        "unknown section",
        "duplicate alias across targets",
    }
]


@pytest.mark.parametrize(("case", "mutate", "key"), CLI_ERRORS, ids=[c for c, _, _ in CLI_ERRORS])
def test_check_config_exits_2_with_one_line_naming_the_key(
    tmp_path: Path, case: str, mutate: Mutation, key: str
) -> None:
    path = dump(mutate(example()), tmp_path / "bad.yaml")
    result = cli("check-config", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 2, case
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{key}: " in lines[0]
    assert result.stdout == ""


def test_check_config_on_a_missing_file_exits_2_with_one_line(tmp_path: Path) -> None:
    result = cli("check-config", "-c", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "missing.yaml" in result.stderr


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    path = dump(example(), tmp_path / "good.yaml")
    result = cli("check-config", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "@route:example.org" in result.stdout


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))


def test_generate_registration_writes_fresh_tokens_into_both_files(tmp_path: Path) -> None:
    config_path = example_copy(tmp_path)
    first = cli("generate-registration", "-c", str(config_path), "-o", "reg1.yaml", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    config_1, reg_1 = load_yaml(config_path), load_yaml(tmp_path / "reg1.yaml")
    tokens_1 = (config_1["appservice"]["as_token"], config_1["appservice"]["hs_token"])
    assert tokens_1 == (reg_1["as_token"], reg_1["hs_token"])
    assert tokens_1[0] != tokens_1[1]
    assert all(len(t) >= 32 and t != "generate-me" for t in tokens_1)

    second = cli("generate-registration", "-c", str(config_path), "-o", "reg2.yaml", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    config_2, reg_2 = load_yaml(config_path), load_yaml(tmp_path / "reg2.yaml")
    tokens_2 = (config_2["appservice"]["as_token"], config_2["appservice"]["hs_token"])
    assert tokens_2 == (reg_2["as_token"], reg_2["hs_token"])
    assert set(tokens_1).isdisjoint(tokens_2)

    # The rewritten config is valid as it stands: the tokens are in the file.
    assert cli("check-config", "-c", str(config_path), cwd=tmp_path).returncode == 0

    # Comments and every other setting survive the rewrite.
    rewritten = config_path.read_text(encoding="utf-8")
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("#"):
            assert line.strip() in rewritten, line
    original = YAML(typ="safe", pure=True).load(EXAMPLE.read_text(encoding="utf-8"))
    for section in original:
        if section not in ("appservice", "api"):
            assert config_2[section] == original[section]
    # The example's placeholder API token is replaced once, and said so; a real one stays.
    assert "api.tokens" in first.stdout and "api.tokens" not in second.stdout
    [api_token] = config_2["api"]["tokens"]
    assert config_1["api"]["tokens"] == [api_token] and len(api_token) >= 32
    assert api_token not in first.stdout  # named where it is, not printed
    assert {**config_2["api"], "tokens": None} == {**original["api"], "tokens": None}

    # The registration: the bot's exclusive namespace, the listener's URL, a private file.
    assert reg_2["url"] == original["appservice"]["address"]
    assert reg_2["id"] == original["appservice"]["id"]
    assert reg_2["sender_localpart"] == "route"
    users = reg_2["namespaces"]["users"]
    assert len(users) == 1 and users[0]["exclusive"] is True
    assert re.fullmatch(users[0]["regex"], "@route:example.org")
    for other in (
        "@router:example.org",
        "@rout:example.org",
        "@route:exampleXorg",
        "@alice:example.org",
        "@_route:example.org",
    ):
        assert not re.match(users[0]["regex"], other), other
    assert stat.S_IMODE((tmp_path / "reg2.yaml").stat().st_mode) & 0o077 == 0


def test_registration_namespace_matches_only_the_bot_user(tmp_path: Path) -> None:
    config_path = example_copy(tmp_path)
    result = cli("generate-registration", "-c", str(config_path), "-o", "reg.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    regex = load_yaml(tmp_path / "reg.yaml")["namespaces"]["users"][0]["regex"]
    for other in ("@route:example.org.evil", "@route:example.orgx"):
        assert not re.match(regex, other), other  # Synapse's semantics: a match at the start


def test_generate_registration_on_a_bad_config_exits_2_and_writes_nothing(
    tmp_path: Path,
) -> None:
    config_path = tmp_path / "config.yaml"
    text = EXAMPLE.read_text(encoding="utf-8").replace("  domain: example.org\n", "")
    config_path.write_text(text, encoding="utf-8")
    result = cli("generate-registration", "-c", str(config_path), "-o", "reg.yaml", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "homeserver.domain" in lines[0], result.stderr
    assert config_path.read_text(encoding="utf-8") == text
    assert not (tmp_path / "reg.yaml").exists()


def test_encryption_is_on_by_default_when_python_olm_is_installed() -> None:
    from route_sidecar.config import encryption_available

    config = parse_config(example(), {})
    assert config.encryption.enabled is encryption_available()
    assert config.encryption.key_wait.total_seconds() == 10


def test_encryption_can_be_switched_off_and_its_keys_are_checked() -> None:
    off = parse_config(example() | {"encryption": {"enabled": False}}, {})
    assert off.encryption.enabled is False
    assert error_of(example() | {"encryption": {"enabled": "yes"}}, {}).key == (
        "encryption.enabled"
    )
    assert error_of(example() | {"encryption": {"key_wait": "soon"}}, {}).key == (
        "encryption.key_wait"
    )
    assert error_of(example() | {"encryption": {"enabeld": True}}, {}).key == ("encryption.enabeld")


def test_encryption_asked_for_without_python_olm_is_refused_naming_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import route_sidecar.config

    monkeypatch.setattr(route_sidecar.config, "encryption_available", lambda: False)
    error = error_of(example() | {"encryption": {"enabled": True}}, {})
    assert error.key == "encryption.enabled" and "python-olm" in str(error)
    assert parse_config(example(), {}).encryption.enabled is False  # the default follows


ENCRYPTION_FLAGS = {
    "org.matrix.msc3202": True,
    "io.element.msc4190": True,
    "de.sorunome.msc2409.push_ephemeral": True,
    "receive_ephemeral": True,
}


@pytest.mark.parametrize("enabled", [True, False])
def test_the_registration_asks_for_what_encryption_needs_only_when_it_is_on(
    tmp_path: Path, enabled: bool
) -> None:
    from route_sidecar.config import encryption_available

    if enabled and not encryption_available():
        pytest.fail("python-olm is part of the test environment (.[test,encryption])")
    raw = example()
    raw["encryption"]["enabled"] = enabled
    config_path = dump(raw, tmp_path / "config.yaml")
    result = cli("generate-registration", "-c", str(config_path), "-o", "reg.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    registration = load_yaml(tmp_path / "reg.yaml")
    shown = {key: registration.get(key) for key in ENCRYPTION_FLAGS}
    assert shown == (ENCRYPTION_FLAGS if enabled else dict.fromkeys(ENCRYPTION_FLAGS))


def test_history_retention_is_a_documented_duration_of_30_days_by_default() -> None:
    assert "history_retention" in EXAMPLE.read_text(encoding="utf-8")
    assert parse_config(example(), {}).history_retention == timedelta(days=30)
    assert delete_path(example(), ("limits", "history_retention"))["limits"]
    default = parse_config(delete_path(example(), ("limits", "history_retention")), {})
    assert default.history_retention == timedelta(days=30)
    raw = set_path(example(), ("limits", "history_retention"), "48h")
    assert parse_config(raw, {}).history_retention == timedelta(hours=48)
    assert error_of(set_path(example(), ("limits", "history_retention"), "soon")).key == (
        "limits.history_retention"
    )
    # Shorter than a day would forget what the rate limit and redelivery checks read.
    too_short = error_of(set_path(example(), ("limits", "history_retention"), "23h"))
    assert too_short.key == "limits.history_retention" and "24h" in str(too_short)


def test_describe_command_is_on_by_default_and_a_boolean() -> None:
    """MSC4391: the command is described (and structured invocations taken) unless
    `routing.describe_command: false`."""
    assert parse_config(example(), {}).routing.describe_command is True
    without = example()
    del without["routing"]["describe_command"]
    assert parse_config(without, {}).routing.describe_command is True
    off = set_path(example(), ("routing", "describe_command"), False)
    assert parse_config(off, {}).routing.describe_command is False
    error = error_of(set_path(example(), ("routing", "describe_command"), "yes"))
    assert error.key == "routing.describe_command" and "true or false" in str(error)
    assert "\n" not in str(error)
