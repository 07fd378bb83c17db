"""Many real agents in one process: `python -m tests.agent_pool URL PREFIX FIRST COUNT DIR`.

Each is a full `edgerun.agent.core.Agent`: its own MQTT client and session, Last Will,
state directory, dispatcher and worker, speaking the contract like the
agent binary does; only the Python interpreter is shared, so a 2-core machine
can hold hundreds. Ends on SIGTERM, each agent draining as on its own.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

from edgerun.agent.config import AgentConfig
from edgerun.agent.core import Agent
from edgerun.settings import parse_broker_url


def main(argv: list[str]) -> int:
    url, prefix, first, count, directory = argv
    logging.basicConfig(level=logging.WARNING, format="%(threadName)s %(message)s")
    broker = parse_broker_url(url, ("mqtt", "mqtts"))
    agents = [Agent(AgentConfig(broker=broker, node=f"{prefix}{i:03d}", grace=5.0,
                                state_dir=str(Path(directory) / f"{prefix}{i:03d}")))
              for i in range(int(first), int(first) + int(count))]
    return serve(agents)


def serve(agents: list[Agent]) -> int:
    """Run `agents` on a thread each until SIGTERM, then stop each and let it drain."""
    threads = [threading.Thread(target=a.run, name=a.node, daemon=True) for a in agents]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    for thread in threads:
        thread.start()
    print("started", flush=True)
    stop.wait()
    for agent in agents:
        agent.stop()
    for thread in threads:
        thread.join(30)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
