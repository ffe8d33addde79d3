"""The container image's health check (`python -m route_sidecar.healthcheck`): healthy
exactly when `GET /healthz` at the config's `api.listen` answers 200."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from route_sidecar.healthcheck import healthz_url, main

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:29334/healthz"),
        ("0.0.0.0", "http://127.0.0.1:29334/healthz"),
        ("::", "http://[::1]:29334/healthz"),
        ("::1", "http://[::1]:29334/healthz"),
        ("sidecar.internal", "http://sidecar.internal:29334/healthz"),
    ],
)
def test_a_listener_on_every_address_is_asked_on_loopback(host: str, url: str) -> None:
    assert healthz_url(host, 29334) == url


@contextmanager
def answering(status: int) -> Iterator[int]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def config_with_api_on(folder: Path, port: int) -> Path:
    raw = YAML(typ="safe", pure=True).load((REPO / "config.example.yaml").read_text())
    raw["appservice"].update(as_token="as-" + "a" * 32, hs_token="hs-" + "h" * 32)
    raw["api"].update(tokens=["api-" + "t" * 32], listen={"host": "0.0.0.0", "port": port})
    path = folder / "config.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


@pytest.mark.parametrize(("status", "code"), [(200, 0), (503, 1)])
def test_healthy_only_when_healthz_answers_200(tmp_path: Path, status: int, code: int) -> None:
    with answering(status) as port:
        assert main(["-c", str(config_with_api_on(tmp_path, port))]) == code


def test_unhealthy_when_nothing_listens_or_the_config_is_bad(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with answering(200) as port:
        pass  # closed again: nothing listens there now
    assert main(["-c", str(config_with_api_on(tmp_path, port))]) == 1
    assert main(["-c", str(tmp_path / "missing.yaml")]) == 1
    assert "config error" in capsys.readouterr().err
