"""edgerun-bridge: forwards between MQTT topics and RabbitMQ exchanges through a route table.

See edgerun/bridge/README.md. Nothing runs at import time; the entry point is
edgerun.bridge.main:main.
"""
