"""tornado-gateway: the real-time WebSocket gateway (see README.md and docs/PROTOCOL.md)."""

__version__ = "0.1.0"
