"""campus-gateway: the daemon core."""

__version__ = "0.1.0"
