"""edgerun: run commands on bare-metal machines while they boot a discovery image.

This package holds what the agent, the bridge and the scheduler share: the wire
protocol (pure, stdlib only), configuration helpers, back-off, and a thin MQTT
connection layer over paho.
"""

__version__ = "0.1.0"
