"""The agent: takes tasks from its MQTT topic, runs them, reports every step.

Threads: the MQTT network thread (edgerun.mqtt) only queues what arrives; one
dispatcher validates, remembers and acknowledges each message in arrival
order; `parallel` workers run tasks. A message is PUBACKed only after the
dispatcher handled it, so a message that arrives during shutdown is redelivered
to the next run instead of lost.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from edgerun import __version__
from edgerun.mqtt import Inbound, MqttConnection, TLSFiles, Will
from edgerun.protocol import (
    FINAL_STATES,
    Cancel,
    ErrorCode,
    Output,
    ProtocolError,
    ShellTask,
    State,
    Status,
    Task,
    Topics,
    Update,
    canonical_json,
    decode_bounded,
    encode,
    format_time,
    last_will,
    message_id,
    parse_command,
    rejected,
)

from . import identity
from .config import AgentConfig
from .contain import Containment, make_key
from .factsd import OperatorFacts
from .outcome import Control, Outcome, failure
from .store import TaskLog

if TYPE_CHECKING:
    from edgerun.signing import Verifier

log = logging.getLogger(__name__)

_ONLINE = "online"  # inbox marker: the connection is (back) up, publish the status
# How often the idle agent looks whether its facts changed (a DHCP lease that came after
# the agent started, a new address or host name); a change is published as a new status.
FACTS_CHECK_S = 5.0
# Live output waiting to be written to the broker, all tasks together. paho holds a
# packet copy beside our payload, so memory grows by about twice this at most.
OUTPUT_BUDGET = 8 * 1024 * 1024
# Live output's rate, all tasks together (a token bucket). Without it a flood sent at
# full speed waits in the broker's queue for each slow subscriber (the scheduler), and
# the final update, queued behind it on the same connection, reaches that subscriber
# only after all of it: a 300 MB `yes` kept it away for 27-54 s with a subscriber that
# handles 1,000 messages a second, past a 30 s wait.
OUTPUT_RATE = 4 * 1024 * 1024
OUTPUT_BURST = 8 * 1024 * 1024


class Agent:
    def __init__(self, cfg: AgentConfig, *, sys_root: str = "/") -> None:
        self.cfg, self.node, self.sys_root = cfg, cfg.node, sys_root
        self.topics = Topics(cfg.prefix)
        self.stopping = threading.Event()
        self._stopped = threading.Event()
        self.tasks = TaskLog(cfg.state_dir, cfg.remember)
        self.jail: Containment | None = None  # made in run(): it changes the process
        self._budget_lock = threading.Lock()
        self._unsent = 0  # bytes of live output handed to MQTT and not yet written out
        self._tokens, self._tokens_at = float(OUTPUT_BURST), time.monotonic()
        self._inbox: queue.SimpleQueue[Inbound | str | None] = queue.SimpleQueue()
        self._lock = threading.Condition()
        self._queued: OrderedDict[str, tuple[Task, Control]] = OrderedDict()
        self._running: dict[str, Control] = {}
        # one token per task queued (None: stop): a worker blocks on this C-level queue,
        # woken once; waiting on the Condition it woke, then blocked again on the lock
        # the notifying dispatcher still held (two wake-ups per task, ~0.1 ms)
        self._wake_worker: queue.SimpleQueue[bool | None] = queue.SimpleQueue()
        self._updates_topic = self.topics.updates(self.node)
        self._facts_sent: dict[str, Any] | None = None  # in the last online status
        # labels and custom facts: read on the main thread (facts.d executables may take
        # up to facts_timeout), only looked at by the dispatcher
        self.operator = OperatorFacts(cfg.label_layers, cfg.facts_dir, cfg.facts_timeout,
                                      self.stopping)
        self._operator_facts: dict[str, Any] = {}
        self.verifier: Verifier | None = None
        if cfg.public_key:
            from edgerun.signing import Verifier  # only for signed tasks: not at every start
            self.verifier = Verifier(cfg.public_key)
        self.conn = MqttConnection(
            cfg.broker_nodes, f"edgerun-agent-{self.node}", name="agent-mqtt",
            on_message=self._inbox.put, on_connected=lambda _present: self._inbox.put(_ONLINE),
            subscriptions=[(self.topics.tasks(self.node), 1)], clean_session=False,
            will=Will(self.topics.status(self.node), encode(last_will(self.node)), 1, True),
            manual_ack=True, keepalive=cfg.keepalive,
            tls=TLSFiles(cfg.ca_file, cfg.cert_file, cfg.key_file))

    # --- life cycle ------------------------------------------------------------------
    def run(self) -> int:
        """Serve until stop(); then drain as SIGTERM asks and return the exit code."""
        self.jail = Containment(make_key(self.node, self.cfg.state_dir),
                                cgroups=self.cfg.contain == "auto")
        log.info("edgerun-agent %s: node %s, broker %s, task log %s, %s, tasks contained by %s",
                 __version__, self.node, ",".join(map(str, self.cfg.broker_nodes)),
                 "on disk" if self.tasks.persistent else "in memory",
                 "signed tasks only" if self.verifier else "unsigned tasks accepted",
                 self.jail.mode)
        self._resend_undelivered()
        self._finish_leftovers()
        self._operator_facts = self.operator.read()  # the first status carries them
        self._wait_network()
        self.conn.start()
        dispatcher = threading.Thread(target=self._dispatch_loop, name="dispatch", daemon=True)
        workers = [threading.Thread(target=self._work, name=f"worker-{i}", daemon=True)
                   for i in range(self.cfg.parallel)]
        for thread in (dispatcher, *workers):
            thread.start()
        while not self.stopping.wait(FACTS_CHECK_S):
            self.tasks.flush_marks()  # acknowledged final updates: marked, lazily
            self._operator_facts = self.operator.read()
            if self.conn.connected.is_set() and self._facts_sent is not None and \
                    self._facts() != self._facts_sent:
                self._inbox.put(_ONLINE)
        self._inbox.put(None)
        dispatcher.join()
        self._drain(workers)
        self.conn.publish(self.topics.status(self.node), self._status("offline"), 1, True)
        if not self.conn.flush(5.0):
            log.warning("some updates could not be delivered before exit")
        self.conn.stop()
        self.tasks.close()
        self.jail.close()
        self._stopped.set()
        log.info("stopped")
        return 0

    def stop(self) -> None:
        self.stopping.set()

    def _wait_network(self) -> None:
        """Up to `net_wait` seconds for a default route, so that an agent started while
        DHCP runs connects once the lease is there instead of backing off meanwhile."""
        if self.cfg.net_wait <= 0 or identity.default_route(self.sys_root):
            return
        deadline = time.monotonic() + self.cfg.net_wait
        while not identity.default_route(self.sys_root):
            if time.monotonic() >= deadline:
                log.warning("no default route after %g s; connecting anyway", self.cfg.net_wait)
                return
            if self.stopping.wait(0.05):
                return
        log.info("default route up after %.1f s", self.cfg.net_wait - deadline +
                 time.monotonic())

    def _drain(self, workers: list[threading.Thread]) -> None:
        with self._lock:
            never_started = list(self._queued)
            self._queued.clear()
        for _ in workers:
            self._wake_worker.put(None)
        for task_id in never_started:
            self._final(task_id, failure(ErrorCode.CANCELED, "the agent is shutting down; "
                                         "the task never started", state=State.CANCELED))
        with self._lock:
            if not self._lock.wait_for(lambda: not self._running, self.cfg.grace):
                for control in self._running.values():
                    control.stop(f"the agent is shutting down and the task did not finish "
                                 f"within the {self.cfg.grace:g} s grace")
        for worker in workers:
            worker.join()

    def _resend_undelivered(self) -> None:
        """Final updates an earlier run published but the broker never acknowledged (it
        was killed first): they exist only in the task log, so publish them again.
        Delivery is at least once; the scheduler ignores a duplicate."""
        resend = self.tasks.undelivered()
        if resend:
            log.warning("re-publishing %d final updates the broker had not acknowledged "
                        "before the agent stopped", len(resend))
        for data in resend:
            task_id = json.loads(data)["id"]
            self.conn.publish(self._updates_topic, data, 1, on_done=self._on_delivered(
                task_id, data))

    def _on_delivered(self, task_id: str, data: bytes) -> Callable[[], None]:
        return lambda: self.tasks.delivered(task_id, data)

    def _finish_leftovers(self) -> None:
        """Tasks an earlier run never finished: end what they left running, then say so."""
        assert self.jail is not None
        left = self.jail.sweep()  # before any report: a task reported failed runs no more
        for task_id, count in left.items():
            log.warning("task %s: killed %d processes an earlier run of the agent left", task_id,
                        count)
        for update in self.tasks.unfinished():
            count = left.get(update["id"], 0)
            ended = f"; {count} processes it left running were killed" if count else \
                "; none of its processes were still running"
            self._final(update["id"], failure(
                ErrorCode.INTERNAL, f"the agent restarted while the task was "
                f"{update.get('state')}; it did not finish{ended}"))

    # --- the dispatcher ----------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            if item == _ONLINE:
                self.conn.publish(self.topics.status(self.node), self._status("online"), 1, True)
                continue
            assert isinstance(item, Inbound)
            try:
                self._handle(item.payload)
            except Exception as exc:  # a bug: answer it, never drop the message or die
                log.exception("internal error while handling a message")
                self._answer_internal(item.payload, exc)
            self.conn.ack(item)

    def _answer_internal(self, payload: bytes, exc: Exception) -> None:
        try:
            obj = decode_bounded(payload, self.cfg.max_message_bytes)
            task_id = message_id(obj)
        except Exception:
            task_id = None
        try:
            self._publish(rejected(self.node, task_id, ErrorCode.INTERNAL,
                                   f"the agent failed while reading the message: "
                                   f"{type(exc).__name__}").to_dict(), remember=False)
        except Exception:
            log.exception("cannot even answer the message")

    def _handle(self, payload: bytes) -> None:
        kind = None
        try:
            obj = decode_bounded(payload, self.cfg.max_message_bytes)
            task_id = message_id(obj)
            kind = obj.get("kind")
            if self.verifier is not None:
                # before anything else, and never remembered: a forger must not be able
                # to use up a task id or learn what an id's latest update was
                problem = self.verifier.check(obj)
                if problem:
                    raise ProtocolError(ErrorCode.BAD_SIGNATURE, problem, task_id)
            if task_id is not None and obj.get("kind") == "task":
                previous = self.tasks.get(task_id)
                if previous is not None:
                    log.info("task %s was seen before: re-publishing its latest update", task_id)
                    self.conn.publish(self._updates_topic, previous, 1,
                                      on_done=self._on_delivered(task_id, previous))
                    return
            command = parse_command(obj)
        except ProtocolError as exc:
            # a refused cancel says nothing about its task: marked, and never remembered
            # as the task's latest update (PROTOCOL.md, "cancel")
            of = "cancel" if kind == "cancel" and exc.task_id is not None else None
            log.warning("rejected a %s (%s): %s", of or "message", exc.code, exc.message)
            self._publish(rejected(self.node, exc.task_id, exc.code, exc.message, of).to_dict(),
                          remember=exc.code != ErrorCode.BAD_SIGNATURE and of is None)
            return
        if isinstance(command, Cancel):
            self._cancel(command.id, command.if_queued)
        else:
            self._accept(command)

    def _accept(self, task: Task) -> None:
        if task.expires_at and datetime.now(UTC) > task.expires_at:
            self._reject(task.id, ErrorCode.EXPIRED,
                         f"the task expired at {format_time(task.expires_at)} before it arrived")
            return
        with self._lock:
            waiting = len(self._queued)
        if waiting >= self.cfg.queue_size:
            self._reject(task.id, ErrorCode.BUSY, f"{waiting} tasks are already waiting on this "
                         f"node; send it again later under a new id")
            return
        # `accepted` is on disk (fdatasync) before any worker sees the task: an agent
        # that restarts finds it there and never starts the command again (at most once)
        self._update(task.id, State.ACCEPTED, durable=True)
        log.info("task %s accepted (%s)", task.id, task.type)
        with self._lock:
            self._queued[task.id] = (task, Control(deadline=float("inf")))
        self._wake_worker.put(True)

    def _reject(self, task_id: str, code: ErrorCode, message: str) -> None:
        log.warning("task %s rejected (%s): %s", task_id, code, message)
        self._publish(rejected(self.node, task_id, code, message).to_dict())

    def _cancel(self, task_id: str, if_queued: bool = False) -> None:
        with self._lock:
            entry = self._queued.pop(task_id, None)
            control = self._running.get(task_id)
        if entry is not None:
            self._final(task_id, failure(ErrorCode.CANCELED, "canceled before it started",
                                         state=State.CANCELED))
        elif control is not None and if_queued:
            log.info("task %s has started: a cancel if_queued leaves it to finish", task_id)
        elif control is not None:
            control.stop("canceled by request while running")
        # an unknown or finished task: nothing to answer (PROTOCOL.md, "cancel")

    # --- the workers -----------------------------------------------------------------
    def _work(self) -> None:
        while True:
            if self._wake_worker.get() is None:
                return  # the agent is stopping: what never started was answered by _drain
            with self._lock:
                if not self._queued:
                    continue  # its task was canceled before it started
                task_id, (task, control) = self._queued.popitem(last=False)
                self._running[task_id] = control
            try:
                self._execute(task, control)
            except Exception as exc:  # a bug must not end the worker (the queue would stall)
                log.exception("task %s: internal error", task_id)
                try:
                    self._final(task_id, failure(ErrorCode.INTERNAL, f"the agent failed while "
                                                 f"running the task: {type(exc).__name__}"))
                except Exception:
                    log.exception("task %s: cannot report the internal error", task_id)
            finally:
                with self._lock:
                    del self._running[task_id]
                    self._lock.notify_all()
                if self.jail is not None:
                    self.jail.tidy()  # after the final update: not on its path

    def _execute(self, task: Task, control: Control) -> None:
        control.deadline = Control.for_timeout(task.timeout).deadline
        said: list[bool] = []

        def running() -> None:
            if not said:
                said.append(True)
                self._update(task.id, State.RUNNING)
        try:
            if isinstance(task, ShellTask):
                # imported at a node's first task of its kind (not at idle: subprocess
                # alone is ~1 MiB), and only that kind: a shell task does not wait ~2.4 ms
                # for the download runner's tempfile, shutil, bz2 and lzma
                from .shell import run_shell
                # `running` goes out once the command was forked: its encoding, log
                # record and publish overlap the command's start instead of delaying it
                outcome = run_shell(task, control, self._emitter(task.id), self.jail,
                                    running)
            else:
                from .download import run_download
                running()
                outcome = run_download(task, control)
        except Exception as exc:
            log.exception("task %s: internal error", task.id)
            outcome = failure(ErrorCode.INTERNAL, f"the agent failed while running the task: "
                              f"{type(exc).__name__}: {exc}")
        running()  # every final update follows a `running` (an internal error before it)
        self._final(task.id, outcome)

    def _emitter(self, task_id: str) -> Any:
        """Live output under one memory budget for the whole agent: a chunk is sent only
        while the output not yet written to the broker's socket stays within
        OUTPUT_BUDGET bytes; beyond it (a stalled broker, a flood) it is dropped."""
        seq = itertools.count()
        topic = self.topics.output(self.node)

        def emit(stream: str, data: str) -> bool:
            number = next(seq)  # counted even when dropped, so a gap shows the loss
            if not self.conn.connected.is_set() or \
                    self._unsent + len(data) > OUTPUT_BUDGET:
                return False
            out = Output(task_id, self.node, stream, number, data)  # type: ignore[arg-type]
            payload = encode(out)
            size = len(payload)
            with self._budget_lock:
                now = time.monotonic()
                self._tokens = min(OUTPUT_BURST,
                                   self._tokens + (now - self._tokens_at) * OUTPUT_RATE)
                self._tokens_at = now
                if self._unsent + size > OUTPUT_BUDGET or self._tokens < size:
                    return False
                self._tokens -= size
                self._unsent += size
            self.conn.publish(topic, payload, 0, on_sent=lambda: self._sent(size))
            return True
        return emit

    def _sent(self, size: int) -> None:
        with self._budget_lock:
            self._unsent -= size

    # --- updates ----------------------------------------------------------------------
    def _final(self, task_id: str, outcome: Outcome) -> None:
        self._update(task_id, outcome.state, **outcome.fields)
        error = outcome.fields.get("error")
        log.info("task %s %s%s", task_id, outcome.state, f" ({error.code}: {error.message})"
                 if error else "")

    def _update(self, task_id: str, state: State, *, durable: bool = False,
                **fields: Any) -> None:
        update = Update(id=task_id, node=self.node, state=state, at=format_time(), **fields)
        self._publish(update.to_dict(), durable=durable)

    def _publish(self, update: dict[str, Any], *, durable: bool = False,
                 remember: bool = True) -> None:
        data = self._fit(update)  # encoded once: published and logged as these bytes
        if not remember:
            self.conn.publish(self._updates_topic, data, 1)
            return
        self.tasks.record(update, data=data)
        if durable:
            self.tasks.sync()  # on disk before it is published, and before the task runs
        task_id = update.get("id")
        # the PUBACK of a final update is noted (cheaply) so a restart need not re-send it
        self.conn.publish(self._updates_topic, data, 1, on_done=self._on_delivered(
            task_id, data) if isinstance(task_id, str) and update.get("state") in FINAL_STATES
            else None)

    def _fit(self, update: dict[str, Any]) -> bytes:
        """Shorten output tails (keeping their ends) until the update fits the size limit;
        returns its wire bytes."""
        data = canonical_json(update)
        while len(data) > self.cfg.max_message_bytes:
            longer = max(("stdout", "stderr"), key=lambda k: len(update.get(k) or ""))
            text = update.get(longer) or ""
            if not text:
                break
            update[longer] = text[len(text) // 2 + 1:]
            update["truncated"] = True
            data = canonical_json(update)
        return data

    def _status(self, state: Literal["online", "offline"]) -> bytes:
        with self._lock:
            running = tuple(self._running)
        facts = self._facts() if state == "online" else None
        if facts is not None:
            self._facts_sent = facts
        return encode(Status(self.node, state, at=format_time(), agent=__version__,
                             facts=facts, running=running))

    def _facts(self) -> dict[str, Any]:
        """The discovery catalog with the operator's `labels` and `custom` (each only when
        there are some), as the last facts check read them."""
        return {**identity.facts(self.sys_root), **self._operator_facts}

    def wait_stopped(self, timeout: float) -> bool:
        return self._stopped.wait(timeout)
