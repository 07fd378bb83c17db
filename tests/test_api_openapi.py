"""The OpenAPI document (issue 23): built from the one route table the app serves, every
status an operation answers listed, and `schemathesis run --checks all` against a live
service passing with bounded examples. The service here has simulated nodes only (no
agent): the fuzzer dispatches whatever its schemas allow, and nothing runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgerun.scheduler.api.server import ApiConfig, build_app

from .apikit import FakeFleet, call, wait_for
from .brokers import Mosquitto
from .scheduler_kit import running_app

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    tmp = tmp_path_factory.mktemp("openapi")
    mosquitto = Mosquitto(tmp / "mosquitto").start()
    fleet = FakeFleet(mosquitto.url)
    try:
        with running_app(mosquitto.url, tmp) as app:
            assert app.admin_token is not None and app.api is not None
            fleet.online(["fz-1", "fz-2"])
            wait_for(lambda: call(app.api.port, "GET", "/v1/nodes",
                                  app.admin_token).body["total"] == 2)
            yield app, app.admin_token
    finally:
        fleet.close()
        mosquitto.stop()


def test_the_document_is_the_route_table(live: tuple[Any, str]) -> None:
    app, _token = live
    doc = call(app.api.port, "GET", "/v1/openapi.json").body
    served = {route.path for route in build_app(app.service, ApiConfig()).routes
              if hasattr(route, "methods")}
    documented = set(doc["paths"])
    # the console's page and the WebSocket (which OpenAPI cannot describe) aside
    assert served - documented == {"/", "/v1/ws"}
    assert documented <= served
    for path, item in doc["paths"].items():
        for method, op in item.items():
            statuses = set(op["responses"])
            public = op["security"] == []
            assert public or {"401", "403"} <= statuses, (method, path)
            if "requestBody" in op:
                assert {"400", "408", "409", "413", "422"} <= statuses, (method, path)
            if "{" in path:
                assert {"404", "422"} <= statuses, (method, path)
    # the schemas sit beside their routes: the dispatch body says what a task is
    dispatch = doc["paths"]["/v1/tasks"]["post"]["requestBody"]["content"]
    task = dispatch["application/json"]["schema"]["properties"]["task"]
    assert {s["properties"]["type"]["const"] for s in task["oneOf"]} == {"shell", "download"}


def test_schemathesis_checks_all_pass(live: tuple[Any, str], tmp_path: Path) -> None:
    app, token = live
    env = {**os.environ, "HOME": str(tmp_path)}  # its cache and reports stay in tmp
    proc = subprocess.run(
        [str(SCHEMATHESIS), "run", f"{app.api_url}/v1/openapi.json", "--checks", "all",
         "-H", f"Authorization: Bearer {token}", "--max-examples", "10",
         "--generation-deterministic", "--generation-allow-x00", "false",
         "--exclude-path", "/v1/events",  # a stream never ends; tests/test_api_streams.py
         "--workers", "1", "--request-timeout", "20"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
