"""The bridge's exception root."""

from edgerun.errors import EdgerunError


class BridgeError(EdgerunError):
    """A broker call failed where the bridge made it (pika errors are turned into this)."""
