"""`python -m route_sidecar.healthcheck [-c config.yaml]`: exit 0 when the running
side-car's `GET /healthz` answers 200, 1 otherwise; the container image's health check.

It reads the lookup API's address from the config, so a changed port needs no change to
the image. Standard library only, and it prints no token.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .config import ConfigError, load_config

# A listener bound to every address is asked on loopback.
_ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def healthz_url(host: str, port: int) -> str:
    host = _ANY_ADDRESS.get(host, host)
    return f"http://[{host}]:{port}/healthz" if ":" in host else f"http://{host}:{port}/healthz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m route_sidecar.healthcheck")
    parser.add_argument("-c", "--config", default="config.yaml", help="config file")
    args = parser.parse_args(argv)
    try:
        listen = load_config(Path(args.config)).api.listen
    except ConfigError as error:
        print(f"unhealthy: config error: {error}", file=sys.stderr)
        return 1
    url = healthz_url(listen.host, listen.port)
    # Never through a proxy from the environment: the side-car is local.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=4) as response:
            status = int(response.status)
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError as error:
        print(f"unhealthy: {url}: {error}", file=sys.stderr)
        return 1
    print(f"{url}: {status}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
