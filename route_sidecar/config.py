"""The config file: YAML → typed `Config`, once, with one precise error per problem.

`config.example.yaml` is the reference for every key. Secrets may come from the
environment instead of the file (see `SECRET_ENV`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from .core.commands import DEFAULT_PREFIXES, RESERVED_WORDS, parse_duration

SECRET_ENV = {
    ("appservice", "as_token"): "ROUTE_SIDECAR_AS_TOKEN",
    ("appservice", "hs_token"): "ROUTE_SIDECAR_HS_TOKEN",
    ("api", "tokens"): "ROUTE_SIDECAR_API_TOKENS",  # comma-separated
}
# The example files' stand-ins for secrets (config.example.yaml, registration.yaml):
# refused wherever they come from.
PLACEHOLDER_SECRETS = frozenset(
    {
        "generate-me",
        "change-me-to-a-long-random-token",
        "generate-me-as-token",
        "generate-me-hs-token",
    }
)
MIN_SECRET_LENGTH = 16
MIN_HISTORY_RETENTION = timedelta(hours=24)
_TARGET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_LOCALPART = re.compile(r"[a-z0-9._=/+-]+")
_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_MISSING = object()


class ConfigError(Exception):
    """One problem with the config, naming the key: `api.tokens: must be a list`."""

    def __init__(self, key: str, problem: str) -> None:
        shown = key if key.isprintable() else repr(key)  # one line, whatever the file holds
        super().__init__(f"{shown}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class HomeserverConfig:
    address: str
    domain: str


@dataclass(frozen=True, slots=True)
class AppserviceConfig:
    id: str
    bot_localpart: str
    bot_displayname: str
    address: str  # how the homeserver reaches the appservice listener
    listen: Listen
    as_token: str
    hs_token: str


@dataclass(frozen=True, slots=True)
class ApiConfig:
    listen: Listen
    tokens: tuple[str, ...]
    max_body_bytes: int


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    model: str
    aliases: tuple[str, ...] = ()
    level: int = 0
    description: str = ""


@dataclass(frozen=True, slots=True)
class RawModels:
    allowed: bool = False
    patterns: tuple[re.Pattern[str], ...] = ()
    level: int = 100


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    prefixes: tuple[str, ...] = DEFAULT_PREFIXES
    intent_ttl: timedelta = timedelta(minutes=15)
    turn_idle: timedelta = timedelta(minutes=5)
    max_turns: int = 10
    max_duration: timedelta = timedelta(hours=4)
    raw_models: RawModels = RawModels()
    failure_grace: timedelta = timedelta(seconds=15)
    # How long an `again` waits for an agent to take its question before the bot says
    # none did (an agent without the plugin never sees it).
    again_wait: timedelta = timedelta(seconds=60)
    # Where the room is told what served each routed turn: by editing the command's
    # confirmation (`confirmation`), or by a receipt in the turn's thread (`thread`).
    receipts: str = "confirmation"
    # Describe the command for clients that read MSC4391, and take their structured
    # invocations as commands.
    describe_command: bool = True


RECEIPT_PLACES = ("confirmation", "thread")


@dataclass(frozen=True, slots=True)
class EncryptionConfig:
    enabled: bool = False
    device_name: str = "route-sidecar"
    # How long an encrypted message waits for its room key before the bot says it
    # cannot read it.
    key_wait: timedelta = timedelta(seconds=10)


@dataclass(frozen=True, slots=True)
class Config:
    homeserver: HomeserverConfig
    appservice: AppserviceConfig
    api: ApiConfig
    database_path: Path  # absolute (`database_location`)
    targets: Mapping[str, Target]
    routing: RoutingConfig
    permissions: Mapping[str, int]
    rooms: frozenset[str]
    agents: frozenset[str]
    routes_per_hour: int
    # How long command, outcome, delivered-reply and transaction records are kept.
    history_retention: timedelta = timedelta(days=30)
    log_level: str = "INFO"
    encryption: EncryptionConfig = EncryptionConfig()
    path: Path | None = field(default=None, compare=False)  # absolute
    # Where versions before this one put the encryption store: a relative `database` was
    # joined to the config's folder as given on the command line, and mautrix read the
    # resulting relative `sqlite:///` path from the filesystem root. Moved back on start.
    misplaced_crypto_stores: tuple[Path, ...] = field(default=(), compare=False)

    @property
    def bot_user_id(self) -> str:
        return f"@{self.appservice.bot_localpart}:{self.homeserver.domain}"


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file; raises ConfigError with the key at fault."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError("", f"cannot read config file {path}: {error.strerror}") from None
    try:
        raw = YAML(typ="safe", pure=True).load(text)
    except YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError("", f"{path} is not valid YAML{where}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError("", f"{path} must hold a mapping of sections")
    return parse_config(raw, environ if environ is not None else os.environ, path)


def parse_config(
    raw: Mapping[str, Any], environ: Mapping[str, str], path: Path | None = None
) -> Config:
    reader = _Reader(raw, environ)
    domain = reader.string("homeserver.domain")
    homeserver = HomeserverConfig(address=reader.url("homeserver.address"), domain=domain)
    appservice = AppserviceConfig(
        id=reader.string("appservice.id", "route-sidecar"),
        bot_localpart=reader.matching("appservice.bot_localpart", _LOCALPART, "route"),
        bot_displayname=reader.string("appservice.bot_displayname", "Route"),
        address=reader.url("appservice.address"),
        listen=reader.listen("appservice.listen", 29333),
        as_token=reader.secret("appservice.as_token"),
        hs_token=reader.secret("appservice.hs_token"),
    )
    if appservice.hs_token == appservice.as_token:
        raise ConfigError(
            "appservice.hs_token", "must differ from appservice.as_token (a fresh random string)"
        )
    api_listen = reader.listen("api.listen", 29334)
    tokens = reader.tokens("api.tokens")
    if {appservice.as_token, appservice.hs_token} & set(tokens):
        raise ConfigError(
            "api.tokens", "must differ from appservice.as_token and appservice.hs_token"
        )
    api = ApiConfig(
        listen=api_listen,
        tokens=tokens,
        max_body_bytes=reader.integer("api.max_body_bytes", 1_048_576, minimum=1024),
    )
    database = reader.string("database")
    if not database.startswith("sqlite:///") or len(database) <= len("sqlite:///"):
        raise ConfigError("database", "must be sqlite:///<path>, e.g. sqlite:///route-sidecar.db")
    database_path, misplaced = database_location(Path(database[len("sqlite:///") :]), path)
    targets = reader.targets("targets")
    routing = RoutingConfig(
        prefixes=reader.prefixes("routing.prefixes"),
        intent_ttl=reader.duration("routing.intent_ttl", timedelta(minutes=15)),
        turn_idle=reader.duration("routing.turn_idle", timedelta(minutes=5)),
        max_turns=reader.integer("routing.max_turns", 10, minimum=1),
        max_duration=reader.duration("routing.max_duration", timedelta(hours=4)),
        raw_models=RawModels(
            allowed=reader.boolean("routing.raw_models.allowed", False),
            patterns=reader.patterns("routing.raw_models.patterns"),
            level=reader.integer("routing.raw_models.level", 100, minimum=0),
        ),
        failure_grace=reader.duration("routing.failure_grace", timedelta(seconds=15)),
        again_wait=reader.duration("routing.again_wait", timedelta(seconds=60)),
        receipts=reader.choice("routing.receipts", RECEIPT_PLACES, RECEIPT_PLACES[0]),
        describe_command=reader.boolean("routing.describe_command", True),
    )
    permissions = reader.permissions("permissions")
    rooms = frozenset(reader.string_list("rooms", prefix="!"))
    agents = frozenset(reader.string_list("agents", prefix="@"))
    routes_per_hour = reader.integer("limits.routes_per_hour", 30, minimum=0)
    history_retention = reader.duration("limits.history_retention", timedelta(hours=720))
    # The rate limit counts the last hour's commands; a redelivered transaction is known
    # by its record: a day keeps both whatever the homeserver's retry schedule.
    if history_retention < MIN_HISTORY_RETENTION:
        raise ConfigError("limits.history_retention", "must be at least 24h")
    log_level = reader.choice("logging.level", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO")
    encryption = _encryption(reader)
    reader.no_unknown_keys()
    return Config(
        homeserver=homeserver,
        appservice=appservice,
        api=api,
        database_path=database_path,
        targets=targets,
        routing=routing,
        permissions=permissions,
        rooms=rooms,
        agents=agents,
        routes_per_hour=routes_per_hour,
        history_retention=history_retention,
        log_level=log_level,
        encryption=encryption,
        path=Path(os.path.abspath(path)) if path is not None else None,
        misplaced_crypto_stores=misplaced,
    )


def database_location(written: Path, config_path: Path | None) -> tuple[Path, tuple[Path, ...]]:
    """The database file as an absolute path (a relative one is relative to the config
    file's folder, or to the working directory without a file), and where earlier versions
    put the encryption store for the same config: the relative path they built (config
    folder as given, joined to `written`), and `written` alone, each read from `/`."""
    base = config_path.parent if config_path is not None else Path()
    absolute = Path(os.path.abspath(base / written))
    if written.is_absolute():
        return absolute, ()
    earlier = (base / written, written)
    misplaced = {Path(os.path.normpath("/" + str(old))) for old in earlier if not old.is_absolute()}
    misplaced.discard(absolute)
    return absolute, tuple(sorted(misplaced))


def encryption_available() -> bool:
    """python-olm and the rest of mautrix's crypto dependencies are installed."""
    try:
        import olm  # noqa: F401
        from mautrix.crypto import PgCryptoStore  # None without asyncpg
    except ImportError:
        return False
    return PgCryptoStore is not None


def _encryption(reader: _Reader) -> EncryptionConfig:
    """On by default when the dependencies are present; `false` turns it off."""
    enabled = reader.get("encryption.enabled", None)
    if enabled is not None and not isinstance(enabled, bool):
        raise ConfigError("encryption.enabled", "must be true or false")
    available = enabled is not False and encryption_available()  # olm's import is slow
    if enabled and not available:
        raise ConfigError(
            "encryption.enabled",
            "needs python-olm: pip install 'route-sidecar[encryption]', or set it to false",
        )
    return EncryptionConfig(
        enabled=available if enabled is None else enabled,
        device_name=reader.string("encryption.device_name", "route-sidecar"),
        key_wait=reader.duration("encryption.key_wait", timedelta(seconds=10)),
    )


# Every key the reader knows; anything else in the file is a typo and an error.
_KNOWN = {
    "homeserver": {"address", "domain"},
    "appservice": {
        "id",
        "bot_localpart",
        "bot_displayname",
        "address",
        "listen",
        "as_token",
        "hs_token",
    },
    "api": {"listen", "tokens", "max_body_bytes"},
    "database": None,
    "targets": None,
    # Every field of RoutingConfig is a key of its section, named alike.
    "routing": {routing_field.name for routing_field in fields(RoutingConfig)},
    "permissions": None,
    "rooms": None,
    "agents": None,
    "limits": {"routes_per_hour", "history_retention"},
    "logging": {"level"},
    "encryption": {"enabled", "device_name", "key_wait"},
}
_KNOWN_NESTED = {
    "appservice.listen": {"host", "port"},
    "api.listen": {"host", "port"},
    "routing.raw_models": {"allowed", "patterns", "level"},
}


class _Reader:
    """Reads dotted keys from the raw mapping, raising ConfigError naming the key."""

    def __init__(self, raw: Mapping[str, Any], environ: Mapping[str, str]) -> None:
        self.raw = raw
        self.environ = environ

    def get(self, key: str, default: Any = _MISSING) -> Any:
        node: Any = self.raw
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if node is None and default is not _MISSING:
                return default
            if not isinstance(node, Mapping):
                raise ConfigError(".".join(parts[:depth]), "must be a mapping")
            if part not in node or node[part] is None:
                if default is _MISSING:
                    raise ConfigError(key, "is missing")
                return default
            node = node[part]
        return node

    def string(self, key: str, default: Any = _MISSING) -> str:
        value = self.get(key, default)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(key, "must be a non-empty string")
        return value.strip()

    def matching(self, key: str, pattern: re.Pattern[str], default: str) -> str:
        value = self.string(key, default)
        if not pattern.fullmatch(value):
            raise ConfigError(
                key, f"{value!r} is not allowed here (lowercase letters, digits, ._=/+-)"
            )
        return value

    def url(self, key: str) -> str:
        value = self.string(key)
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(key, f"must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    def integer(self, key: str, default: int, minimum: int | None = None) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, "must be a whole number")
        if minimum is not None and value < minimum:
            raise ConfigError(key, f"must be at least {minimum}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(key, "must be true or false")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        """One of `choices`, read case-insensitively, as `choices` spells it."""
        value = self.string(key, default)
        for choice in choices:
            if value.casefold() == choice.casefold():
                return choice
        raise ConfigError(key, f"must be one of {', '.join(choices)}")

    def duration(self, key: str, default: timedelta) -> timedelta:
        value = self.get(key, default)
        if isinstance(value, timedelta):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return timedelta(seconds=value)
        parsed = parse_duration(value) if isinstance(value, str) else None
        if parsed is None:
            raise ConfigError(key, "must be a duration such as 90s, 15m or 2h")
        return parsed

    def listen(self, key: str, default_port: int) -> Listen:
        host = self.string(f"{key}.host", "127.0.0.1")
        port = self.integer(f"{key}.port", default_port, minimum=1)
        if port > 65535:
            raise ConfigError(f"{key}.port", "must be at most 65535")
        return Listen(host=host, port=port)

    def secret(self, key: str) -> str:
        env = SECRET_ENV.get(tuple(key.split(".")))  # type: ignore[arg-type]
        hint = f" (or set {env})" if env else ""
        if env and self.environ.get(env):
            value = self.environ[env]
            if weak_secret(value):
                raise ConfigError(
                    key, f"{env} must be a random string of at least {MIN_SECRET_LENGTH} characters"
                )
            return value
        value = self.get(key, "")
        if not isinstance(value, str) or weak_secret(value):
            raise ConfigError(
                key,
                f"must be a random string of at least {MIN_SECRET_LENGTH} characters{hint}; "
                "`route-sidecar generate-registration` writes one",
            )
        return value

    def tokens(self, key: str) -> tuple[str, ...]:
        env = SECRET_ENV[("api", "tokens")]
        source = ""
        if self.environ.get(env):
            values: Any = [t.strip() for t in self.environ[env].split(",") if t.strip()]
            source = f" in {env}"
        else:
            values = self.get(key, [])
        if not isinstance(values, list) or not all(isinstance(t, str) for t in values):
            raise ConfigError(key, "must be a list of strings")
        if not values:
            raise ConfigError(key, f"needs at least one token (or set {env})")
        for token in values:
            if token in PLACEHOLDER_SECRETS and not source:
                raise ConfigError(
                    key,
                    "holds the example's placeholder; "
                    "`route-sidecar generate-registration` replaces it with a random token",
                )
            if weak_secret(token):
                raise ConfigError(
                    key,
                    f"every token{source} must be a random string of at least "
                    f"{MIN_SECRET_LENGTH} characters",
                )
        if len(set(values)) != len(values):
            raise ConfigError(key, f"lists the same token twice{source}")
        return tuple(values)

    def string_list(self, key: str, prefix: str) -> list[str]:
        values = self.get(key, [])
        if not isinstance(values, list):
            raise ConfigError(key, "must be a list")
        for value in values:
            if not isinstance(value, str) or not value.startswith(prefix):
                raise ConfigError(key, f"every entry must be a string starting with {prefix!r}")
        return values

    def prefixes(self, key: str) -> tuple[str, ...]:
        values = self.get(key, list(DEFAULT_PREFIXES))
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, str) and v and not any(c.isspace() for c in v) for v in values)
        ):
            raise ConfigError(key, "must be a non-empty list of words such as /route and !route")
        return tuple(values)

    def patterns(self, key: str) -> tuple[re.Pattern[str], ...]:
        compiled = []
        for index, value in enumerate(self.string_list(key, prefix="")):
            try:
                compiled.append(re.compile(value))
            except re.error as error:
                raise ConfigError(
                    f"{key}[{index}]", f"is not a valid regular expression: {error}"
                ) from None
        return tuple(compiled)

    def permissions(self, key: str) -> dict[str, int]:
        values = self.get(key, {})
        if not isinstance(values, Mapping):
            raise ConfigError(key, "must map user ids, server names or * to levels")
        result: dict[str, int] = {}
        for who, level in values.items():
            if not isinstance(who, str) or not who:
                raise ConfigError(key, "keys must be user ids, server names or *")
            if isinstance(level, bool) or not isinstance(level, int) or level < 0:
                raise ConfigError(f"{key}.{who}", "must be a whole number >= 0")
            result[who] = level
        return result

    def targets(self, key: str) -> dict[str, Target]:
        values = self.get(key)
        if not isinstance(values, Mapping) or not values:
            raise ConfigError(key, "must map at least one target name to its model")
        targets: dict[str, Target] = {}
        names: dict[str, str] = {}
        for name, spec in values.items():
            where = f"{key}.{name}"
            if not isinstance(name, str) or not _TARGET_NAME.fullmatch(name):
                raise ConfigError(where, "target names are lowercase letters, digits and ._-")
            if not isinstance(spec, Mapping):
                raise ConfigError(where, "must be a mapping with at least `model`")
            unknown = set(spec) - {"model", "aliases", "level", "description"}
            if unknown:
                raise ConfigError(f"{where}.{sorted(unknown)[0]}", "is not a known key")
            model = spec.get("model")
            if not isinstance(model, str) or not model.strip():
                raise ConfigError(f"{where}.model", "is missing")
            aliases = spec.get("aliases") or []
            if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                raise ConfigError(f"{where}.aliases", "must be a list of names")
            level = spec.get("level", 0)
            if isinstance(level, bool) or not isinstance(level, int) or level < 0:
                raise ConfigError(f"{where}.level", "must be a whole number >= 0")
            description = spec.get("description", "")
            if not isinstance(description, str):
                raise ConfigError(f"{where}.description", "must be a string")
            for word in (name, *aliases):
                lowered = word.lower()
                if lowered in RESERVED_WORDS:
                    raise ConfigError(where, f"{word!r} is a command word and cannot name a target")
                if not _TARGET_NAME.fullmatch(lowered):
                    raise ConfigError(f"{where}.aliases", f"{word!r} is not a valid name")
                if lowered in names:
                    raise ConfigError(where, f"{word!r} already names target {names[lowered]!r}")
                names[lowered] = name
            targets[name] = Target(
                name=name,
                model=model.strip(),
                aliases=tuple(a.lower() for a in aliases),
                level=level,
                description=description.strip(),
            )
        return targets

    def no_unknown_keys(self) -> None:
        for section, value in self.raw.items():
            if section not in _KNOWN:
                raise ConfigError(str(section), "is not a known section")
            keys = _KNOWN[section]
            if keys is not None and isinstance(value, Mapping):
                for key in value:
                    if key not in keys:
                        raise ConfigError(f"{section}.{key}", "is not a known key")
        for where, keys in _KNOWN_NESTED.items():
            section, _, name = where.partition(".")
            value = self.raw.get(section)
            nested = value.get(name) if isinstance(value, Mapping) else None
            if isinstance(nested, Mapping):
                for key in nested:
                    if key not in keys:
                        raise ConfigError(f"{where}.{key}", "is not a known key")


def config_warnings(config: Config) -> list[str]:
    """What a valid config may still get wrong, one line each (`check-config` prints them,
    `run` logs them)."""
    warnings = []
    if not config.agents:
        warnings.append(
            "agents is empty: list every agent's Matrix user id, or their answers count as "
            "room questions (`again` may re-ask an agent's own answer)"
        )
    return warnings


def weak_secret(value: str) -> bool:
    """Too short to be a random token, or the example file's stand-in for one."""
    return len(value) < MIN_SECRET_LENGTH or value in PLACEHOLDER_SECRETS


def is_loopback(host: str) -> bool:
    return host in _LOOPBACK or host.startswith("127.")
