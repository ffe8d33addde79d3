"""`route-sidecar run | generate-registration | check-config`.

A bad config stops the program with one line naming the key and the problem, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from .config import SECRET_ENV, Config, ConfigError, load_config, parse_config

EXIT_CONFIG = 2


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
    config_path = Path(getattr(args, "sub_config", None) or args.config)
    try:
        if args.command == "generate-registration":
            return generate_registration(config_path, Path(args.output))
        config = load_config(config_path)
        if args.command == "check-config":
            print(
                f"config OK: {config_path} (bot {config.bot_user_id}, "
                f"{len(config.targets)} targets, API on "
                f"{config.api.listen.host}:{config.api.listen.port})"
            )
            return 0
        setup_logging(config.log_level)
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
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (SECRET_ENV[("appservice", "as_token")], SECRET_ENV[("appservice", "hs_token")])
    }
    config = parse_config(raw, env, config_path)  # validate everything before writing
    with config_path.open("w", encoding="utf-8") as handle:
        yaml.dump(raw, handle)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("# route-sidecar appservice registration: add this file to Synapse's\n")
        handle.write("# app_service_config_files and restart Synapse.\n")
        YAML().dump(registration_for(config), handle)
    print(f"wrote {output}; new tokens stored in {config_path}")
    for key in ("as_token", "hs_token"):
        if os.environ.get(SECRET_ENV[("appservice", key)]):
            print(
                f"warning: {SECRET_ENV[('appservice', key)]} is set and overrides the new "
                f"appservice.{key}; unset it or set it to the new value",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
