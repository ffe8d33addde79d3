"""`route-sidecar run | generate-registration | check-config`.

A bad config stops the program with one line naming the key and the problem, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import secrets
import sys
from io import StringIO
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from .config import (
    PLACEHOLDER_SECRETS,
    SECRET_ENV,
    Config,
    ConfigError,
    config_warnings,
    load_config,
    parse_config,
)

EXIT_CONFIG = 2
log = logging.getLogger("route_sidecar.cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="route-sidecar",
        description="Matrix appservice that lets a room steer its AI agent's LLM routing.",
    )
    parser.add_argument("-c", "--config", default="config.yaml", help="config file")
    commands = parser.add_subparsers(dest="command")
    run_p = commands.add_parser("run", help="run the side-car (the default)")
    run_p.add_argument("-c", "--config", dest="sub_config", help="config file")
    gen = commands.add_parser(
        "generate-registration",
        help="write an appservice registration with fresh tokens (and store them in the config)",
    )
    gen.add_argument("-c", "--config", dest="sub_config", help="config file")
    gen.add_argument("-o", "--output", default="registration.yaml", help="registration file")
    check = commands.add_parser("check-config", help="validate the config file and exit")
    check.add_argument("-c", "--config", dest="sub_config", help="config file")
    args = parser.parse_args(argv)
    # Every file the side-car writes (database and its side files, key, config,
    # registration) is readable by its own user only, whatever the shell's umask.
    os.umask(0o077)
    config_path = Path(getattr(args, "sub_config", None) or args.config)
    try:
        if args.command == "generate-registration":
            return generate_registration(config_path, Path(args.output))
        config = load_config(config_path)
        warnings = config_warnings(config)
        if args.command == "check-config":
            for warning in warnings:
                print(f"route-sidecar: warning: {warning}", file=sys.stderr)
            print(
                f"config OK: {config_path} (bot {config.bot_user_id}, "
                f"{len(config.targets)} targets, API on "
                f"{config.api.listen.host}:{config.api.listen.port})"
            )
            return 0
        setup_logging(config.log_level)
        for warning in warnings:
            log.warning("config warning: %s", warning)
        from .app import event_loop_factory, run

        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(run(config))
        return 0
    except ConfigError as error:
        print(f"route-sidecar: config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # mautrix logs request URLs at DEBUG, aiohttp access logs are off: no token leaks.
    # Libraries that log SQL parameters or request URLs stay quiet: no tokens, no text.
    for noisy in (
        "aiosqlite",
        "route_sidecar.mautrix",
        "route_sidecar.crypto.client",  # request bodies: message text
        "route_sidecar.crypto.db",
        "aiohttp.access",
        "asyncio",
    ):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLevelName(level)))
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
    # mautrix warns on every message that an unverified device is not cross-signed: a
    # bot's normal state, not news.
    logging.getLogger("route_sidecar.crypto.olm").addFilter(
        lambda record: "cross-sign" not in record.getMessage()
    )


def registration_for(config: Config) -> dict[str, Any]:
    localpart = config.appservice.bot_localpart
    domain = re.escape(config.homeserver.domain)
    return {
        "id": config.appservice.id,
        "url": config.appservice.address,
        "as_token": config.appservice.as_token,
        "hs_token": config.appservice.hs_token,
        "sender_localpart": localpart,
        "rate_limited": False,
        "namespaces": {
            # Anchored: Synapse matches from the start only, and `$` keeps
            # `@route:example.org.evil` out of the namespace.
            "users": [{"exclusive": True, "regex": f"^@{re.escape(localpart)}:{domain}$"}],
            "aliases": [],
            "rooms": [],
        },
        # End-to-end encryption without /sync (see synapse-example/homeserver-snippet.yaml):
        # to-device events and device lists pushed in transactions (MSC2409, MSC3202), and
        # the bot's device created by the appservice itself (MSC4190).
        **(
            {
                "de.sorunome.msc2409.push_ephemeral": True,
                "receive_ephemeral": True,
                "org.matrix.msc3202": True,
                "io.element.msc4190": True,
            }
            if config.encryption.enabled
            else {}
        ),
    }


def generate_registration(config_path: Path, output: Path) -> int:
    """Fresh tokens into the config (comments kept) and a registration for the homeserver."""
    yaml = YAML()  # round-trip: keeps the config's comments and order
    yaml.indent(mapping=2, sequence=4, offset=2)
    try:
        raw = yaml.load(config_path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError("", f"cannot read config file {config_path}: {error.strerror}") from None
    except YAMLError:
        raise ConfigError("", f"{config_path} is not valid YAML") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("appservice"), dict):
        raise ConfigError("appservice", "is missing")
    raw["appservice"]["as_token"] = secrets.token_urlsafe(32)
    raw["appservice"]["hs_token"] = secrets.token_urlsafe(32)
    api_env = SECRET_ENV[("api", "tokens")]
    api = raw.get("api")
    replaced = 0
    if (
        not os.environ.get(api_env)
        and isinstance(api, dict)
        and isinstance(api.get("tokens"), list)
    ):
        for index, token in enumerate(api["tokens"]):
            if token in PLACEHOLDER_SECRETS:
                api["tokens"][index] = secrets.token_urlsafe(32)
                replaced += 1
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (SECRET_ENV[("appservice", "as_token")], SECRET_ENV[("appservice", "hs_token")])
    }
    config = parse_config(raw, env, config_path)  # validate everything before writing
    text = StringIO()
    yaml.dump(raw, text)
    write_private(config_path, text.getvalue())
    registration = StringIO()
    registration.write("# route-sidecar appservice registration: add this file to Synapse's\n")
    registration.write("# app_service_config_files and restart Synapse.\n")
    YAML().dump(registration_for(config), registration)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_private(output, registration.getvalue())
    print(f"wrote {output}; new tokens stored in {config_path}")
    if replaced:
        print(
            f"api.tokens held the example's placeholder: a new random API token is stored in "
            f"{config_path}; give it to your dispatcher"
        )
    for key in ("as_token", "hs_token"):
        if os.environ.get(SECRET_ENV[("appservice", key)]):
            print(
                f"warning: {SECRET_ENV[('appservice', key)]} is set and overrides the new "
                f"appservice.{key}; unset it or set it to the new value",
                file=sys.stderr,
            )
    return 0


def write_private(path: Path, text: str) -> None:
    """Replace the file at `path` (through a symlink) with `text`, mode 0600, owned as
    before: written beside it first, so a crash leaves the old file or the new one."""
    target = Path(os.path.realpath(path))
    try:
        owner: tuple[int, int] | None = (target.stat().st_uid, target.stat().st_gid)
    except FileNotFoundError:
        owner = None
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                with contextlib.suppress(OSError):  # only root may give a file away
                    os.fchown(handle.fileno(), *owner)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
