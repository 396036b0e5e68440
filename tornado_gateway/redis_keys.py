"""Every Redis key and channel name, built from the configurable prefix in one place."""

from __future__ import annotations


class Keys:
    __slots__ = ("prefix", "user_channel_prefix", "servers", "dispatch_stream")

    def __init__(self, prefix: str = "gateway") -> None:
        self.prefix = prefix
        self.user_channel_prefix = f"{prefix}:user:"
        self.servers = f"{prefix}:servers"
        self.dispatch_stream = f"{prefix}:stream:dispatch_response"

    def user_channel(self, user_id: str) -> str:
        return f"{self.user_channel_prefix}{user_id}"

    def presence(self, user_id: str) -> str:
        return f"{self.prefix}:presence:{user_id}"

    def server(self, server_id: str) -> str:
        return f"{self.prefix}:server:{server_id}"

    def server_users(self, server_id: str) -> str:
        """Addition to the contract: the users with a device on that instance, for dead-instance cleanup."""
        return f"{self.prefix}:server:{server_id}:users"

    def events(self, kind: str) -> str:
        return f"{self.prefix}:events:{kind}"

    def control(self, server_id: str) -> str:
        """Addition to the contract: per-instance commands such as "close device X of user Y"."""
        return f"{self.prefix}:control:{server_id}"
