"""Two interchangeable messengers behind one interface: AMQP (through the bridge) and MQTT."""

from edgerun.scheduler.messaging.base import Incoming, Messenger, OnDone

__all__ = ["Incoming", "Messenger", "OnDone"]
