"""edgerun-bridge: forwards between MQTT topics and RabbitMQ exchanges through a route table.

See bridge/README.md. Nothing runs at import time; the entry point is bridge.main:main.
"""
