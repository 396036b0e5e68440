"""Every Redis key and channel name, built from the configurable prefix in one place.

In Redis Cluster mode (`REDIS_CLUSTER`) the per-user and per-instance names carry a hash tag, so
that everything of one user (channel, presence, history) lives in the slot of the bare userId and
everything of one instance in the slot of its serverId: `gateway:user:{u1}`,
`gateway:presence:{u1}`, `gateway:server:{i1}`, `gateway:control:{i1}`. A Lua script or function
may only touch keys (and SPUBLISH to channels) of one slot, and the gateway_publish function is
routed by the bare userId. Single-Redis names stay exactly those of the contract (`gateway:user:u1`).
"""

from __future__ import annotations


class Keys:
    __slots__ = ("prefix", "cluster", "user_channel_prefix", "servers")

    def __init__(self, prefix: str = "gateway", *, cluster: bool = False) -> None:
        self.prefix = prefix
        self.cluster = cluster
        self.user_channel_prefix = f"{prefix}:user:"
        self.servers = f"{prefix}:servers"

    def user_channel(self, user_id: str) -> str:
        if self.cluster:
            return self.tagged("user", user_id)
        return f"{self.user_channel_prefix}{user_id}"

    def presence(self, user_id: str) -> str:
        if self.cluster:
            return self.tagged("presence", user_id)
        return f"{self.prefix}:presence:{user_id}"

    def server(self, server_id: str) -> str:
        if self.cluster:
            return self.tagged("server", server_id)
        return f"{self.prefix}:server:{server_id}"

    def tagged(self, kind: str, ident: str, suffix: str = "") -> str:
        """`<prefix>:<kind>:{<ident>}<suffix>`: the slot of the bare ident (see `_history_key` for an
        ident with `}`)."""
        head = f"{self.prefix}:{kind}:{{"
        if "}" not in ident:
            return f"{head}{ident}}}{suffix}"
        return f"{head}{self.hash_tag(ident) or ''}}}{suffix}:{ident}"

    def users(self) -> str:
        """Addition to the contract: the set of userIds with at least one entry in presence, kept by the
        same scripts that write the presence hashes (so SCARD is the cluster's distinct users)."""
        return f"{self.prefix}:users"

    def server_users(self, server_id: str) -> str:
        """Addition to the contract: the users with a device on that instance, for dead-instance cleanup."""
        if self.cluster:
            return self.tagged("server", server_id, ":users")
        return f"{self.prefix}:server:{server_id}:users"

    def stream(self, kind: str) -> str:
        """`gateway:stream:dispatch_response`, and `gateway:stream:receipt` (PROTOCOL.md 7.5)."""
        return f"{self.prefix}:stream:{kind}"

    def events(self, kind: str) -> str:
        return f"{self.prefix}:events:{kind}"

    def event_partition(self, kind: str, partition: int) -> str:
        """Cluster mode with EVENT_SHARDS: one of the kind's sharded channels, `gateway:events:<kind>:{<n>}`."""
        return f"{self.prefix}:events:{kind}:{{{partition}}}"

    def control(self, server_id: str) -> str:
        """Addition to the contract: per-instance commands such as "close device X of user Y"."""
        if self.cluster:
            return self.tagged("control", server_id)
        return f"{self.prefix}:control:{server_id}"

    def probe(self, server_id: str, tag: str) -> str:
        """Cluster mode: the self-probe channel of one shard's subscriber connection; `tag` is
        chosen so that the channel's slot is one that shard serves."""
        return f"{self.prefix}:probe:{{{tag}}}:{server_id}"

    # --- history (PROTOCOL.md section 7) ------------------------------------------------------
    #
    # One user's history keys share the Redis Cluster hash slot of the bare userId, which is what
    # services pass as the only key of `FCALL <prefix>_publish 1 <userId> ...`: Cluster routes the
    # call by that key, and the function then touches only keys of the same slot. The history
    # function in history_redis.py derives the same names from the userId; the two must agree.

    def history(self, user_id: str) -> str:
        """The user's recorded messages, oldest first (a list)."""
        return self._history_key(user_id, "list")

    def history_meta(self, user_id: str) -> str:
        """The user's epoch and last seq (a hash); its absence means a new epoch."""
        return self._history_key(user_id, "meta")

    def history_ids(self, user_id: str) -> str:
        """Producer ids of the kept records, scored by seq (a sorted set), for dedupe."""
        return self._history_key(user_id, "ids")

    def _history_key(self, user_id: str, kind: str) -> str:
        """`<prefix>:history:{u1}[:meta|:ids]` for the usual ids (any id without `}`).

        An id with `}` cannot simply be wrapped in braces (Redis would read a different tag), so
        it gets `<prefix>:history:{<its own hash tag>}:<kind>:<userId>`: the same slot as the bare
        id, and names no other user's key can take. An id with `}` but no valid tag (`a}b`)
        hashes as a whole and no prefixed key can share its slot: it gets the empty tag `{}`,
        unique but, in Cluster only, not routable with the userId as the key. The prefix must
        not contain braces (it would become the tag)."""
        head = f"{self.prefix}:history:{{"
        if "}" not in user_id:
            return f"{head}{user_id}}}" + ("" if kind == "list" else f":{kind}")
        return f"{head}{self.hash_tag(user_id) or ''}}}:{kind}:{user_id}"

    def recordable(self, user_id: str) -> bool:
        """Whether the history function can run for this user: always in single mode; in a cluster,
        unless the id has a `}` but no hash tag (its keys cannot share the bare id's slot)."""
        return not self.cluster or "}" not in user_id or self.hash_tag(user_id) is not None

    @staticmethod
    def hash_tag(key: str) -> str | None:
        """Redis Cluster's rule: the text between the first `{` and the first `}` after it, if not empty."""
        start = key.find("{")
        if start < 0:
            return None
        end = key.find("}", start + 1)
        return key[start + 1:end] if end > start + 1 else None

    def function(self, name: str) -> str:
        """`<prefix>_<name>`: Redis function names allow only letters, digits and `_`, so any other
        character of the prefix becomes `_` (`gw-test` -> `gw_test_publish`)."""
        return f"{self.function_prefix()}_{name}"

    def function_prefix(self) -> str:
        return "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in self.prefix)

    def history_library(self) -> str:
        """The Redis function library holding the history functions of this prefix."""
        return self.function("history")
