"""`edgerun serve` put together: embedded broker (optional), messenger, store, service, API.

`App` is also what the demo and the tests start in-process.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from edgerun.control.errors import BrokerUnreachable
from edgerun.errors import ConfigError
from edgerun.scheduler.api.auth import bootstrap, publish_local, store_token_file
from edgerun.scheduler.api.server import ApiConfig, ApiServer
from edgerun.scheduler.messaging import Messenger
from edgerun.scheduler.messaging.broker import EmbeddedBroker
from edgerun.scheduler.service import Service, ServiceConfig
from edgerun.scheduler.settings import ServeSettings, split_hostport
from edgerun.scheduler.store.db import is_postgres
from edgerun.scheduler.store.tasks import Store
from edgerun.settings import TLSFiles, parse_broker_urls
from edgerun.signing import Signer

log = logging.getLogger(__name__)


@dataclass
class App:
    """The running service; `start()` raises BrokerUnreachable if the broker never answers."""

    settings: ServeSettings
    embedded: EmbeddedBroker | None = None
    service: Service | None = None
    api: ApiServer | None = None
    admin_token: str | None = None
    """The admin token this start created (first start only; also in its 0600 file)."""
    token_copy: Path | None = None
    stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def api_url(self) -> str:
        assert self.api is not None
        return self.api.url

    def start(self) -> App:
        s = self.settings
        host, port = split_hostport(s.listen)
        api_config = ApiConfig(host, port, tls_cert=s.tls_cert, tls_key=s.tls_key,
                               insecure_http=s.insecure_http,
                               allowed_origins=tuple(o.strip() for o in (
                                   s.allowed_origins or "").split(",") if o.strip()))
        api_config.check()  # a listen address that needs TLS: say so before starting anything
        try:
            if s.embedded_broker:
                host, port = split_hostport(s.embedded_broker)
                self.embedded = EmbeddedBroker(host, port).start()
            url = s.broker or (self.embedded.url if self.embedded else None)
            if not url:
                raise ConfigError("no broker: give --broker URL (mqtt://, amqp://, ...) or "
                                  "--embedded-broker HOST:PORT")
            messenger = self._messenger(url)
            signer = Signer.from_file(s.private_key) if s.private_key else None
            store = Store(s.db)
            self.service = Service(store, messenger, ServiceConfig(
                grace=s.grace, tick=s.tick, pace=s.pace, offline_grace=s.offline_grace,
                default_expiry=s.default_expiry,
                keep_days=s.keep_days, resend_unaccepted=self.embedded is not None,
                record_external=s.record_external),
                signer=signer)
            host, port = split_hostport(s.listen)
            self.api = ApiServer(self.service, api_config)
            token_file = Path(s.admin_token_file or store_token_file(s.db))
            self.admin_token = bootstrap(store, token_file)
            if self.admin_token is not None:
                log.warning("first start: wrote an admin token to %s (readable by this user "
                            "only); `edgerun token create` makes more", token_file)
            self.token_copy = publish_local(token_file, self.api.port)
            self.service.start()
            self.api.start()
            if not messenger.connected.wait(s.connect_timeout):
                raise BrokerUnreachable(f"cannot reach the broker {messenger.url}: "
                                        f"{messenger.last_error or 'no answer'}")
        except BaseException:
            self.stop()
            raise
        log.info("edgerun scheduler: API on %s, broker %s (%s), store %s", self.api.url,
                 messenger.url, messenger.kind, store.path)
        return self

    def _messenger(self, url: str) -> Messenger:
        s = self.settings
        brokers = parse_broker_urls(url, ("mqtt", "mqtts", "amqp", "amqps"))
        tls = TLSFiles(s.ca_file, s.cert_file, s.key_file)
        if brokers[0].scheme.startswith("amqp"):
            from edgerun.scheduler.messaging.amqp import AmqpMessenger
            return AmqpMessenger(
                brokers, tasks_exchange=s.tasks_exchange, events_exchange=s.events_exchange,
                audit_exchange=s.audit_exchange, queue=s.queue,
                record_external=s.record_external, tls=tls, queue_type=s.queue_type)
        from edgerun.scheduler.messaging.mqtt import MqttMessenger
        return MqttMessenger(brokers, prefix=s.prefix, client_id=s.client_id,
                             events_topic=s.events_topic, record_external=s.record_external,
                             tls=tls, share_group=s.share_group,
                             members_db=s.db if is_postgres(s.db) else None)

    def stop(self) -> None:
        if self.token_copy is not None:  # only a way to find a running service
            self.token_copy.unlink(missing_ok=True)
            self.token_copy = None
        if self.api is not None:
            self.api.stop()
        if self.service is not None:
            self.service.stop()
            self.service.store.close()
        if self.embedded is not None:
            self.embedded.stop()
        self.stopped.set()
