"""The exception root shared by everything in edgerun."""


class EdgerunError(Exception):
    """Root of every error edgerun raises on purpose."""


class ConfigError(EdgerunError):
    """A configuration value, file, URL or flag is wrong; the message says which."""
