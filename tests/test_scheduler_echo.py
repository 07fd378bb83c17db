"""The scheduler's own tasks come back on its tasks subscription: recognised, never parsed
or written again; tasks other clients publish are still recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgerun.scheduler.echoes import Echoes

from .brokers import Mosquitto, wait_until
from .mqttkit import Observer, shell
from .scheduler_kit import Api, running_app, start_agent


def test_echoes_count_each_payload_sent() -> None:
    echoes = Echoes()
    assert not echoes.take(b"never sent")
    echoes.sent(b"task")
    echoes.sent(b"task")  # the same bytes to two nodes
    echoes.sent(b"other")
    assert len(echoes) == 3
    assert echoes.take(b"task") and echoes.take(b"task") and not echoes.take(b"task")
    assert echoes.take(b"other") and len(echoes) == 0 and echoes.skipped == 3
    assert not echoes.take(b"tasks")  # a byte more is another message


def test_echoes_forget_the_oldest_past_their_limit() -> None:
    echoes = Echoes(limit=3)
    for i in range(5):
        echoes.sent(b"t%d" % i)
    assert len(echoes) == 3
    assert not echoes.take(b"t0") and not echoes.take(b"t1")
    assert echoes.take(b"t2") and echoes.take(b"t4")


def test_own_tasks_are_not_parsed_again_others_are_recorded(
        mosquitto: Mosquitto, observer: Observer, tmp_path: Path) -> None:
    with running_app(mosquitto.url, tmp_path) as app:
        service = app.service
        assert service is not None and service.core.echoes is not None
        parsed: list[str] = []
        real = service._on_task

        def spy(node: str, obj: dict[str, Any]) -> None:  # the real handler, counted
            parsed.append(str(obj.get("id")))
            real(node, obj)
        service._on_task = spy  # type: ignore[method-assign]

        api = Api(app.api_url)
        agent = start_agent(mosquitto.url, "node-e", tmp_path)
        try:
            api.wait_node("node-e")
            ids = [api.dispatch(["node-e"], {"type": "shell", "command": f"echo {i}"})[0]["id"]
                   for i in range(3)]
            for task_id in ids:
                api.wait_state(task_id, "node-e", "succeeded")
            assert wait_until(lambda: service.core.echoes is not None
                              and service.core.echoes.skipped == 3, 20)
            observer.send("node-e", shell("from-elsewhere", "echo other"))
            done = api.wait_state("from-elsewhere", "node-e", "succeeded")
            assert done["source"] == "external" and done["result"]["stdout"] == "other\n"
            # the same bytes as one of ours, from someone else, after ours came back
            ours = api.task(ids[0], "node-e")["spec"]
            observer.send("node-e", json.dumps(ours, separators=(",", ":")).encode())
            assert wait_until(lambda: ids[0] in parsed, 20)
            assert parsed == ["from-elsewhere", ids[0]] and service.core.echoes.skipped == 3
            assert len(service.core.echoes) == 0
        finally:
            assert agent.terminate() == 0


def test_no_echo_memory_without_record_external(mosquitto: Mosquitto, tmp_path: Path) -> None:
    with running_app(mosquitto.url, tmp_path, record_external=False) as app:
        assert app.service is not None and app.service.core.echoes is None
