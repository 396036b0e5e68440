"""The local registry: this instance's connections by id and by user and device. No I/O.

The hub answers the two questions routing needs in O(1): which local devices
does a user have (delivery), and did this add/remove make the user appear or
disappear here (subscribe/unsubscribe to the user's Redis channel).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from .auth import DeviceId, UserId
from .connection import Connection
from .messages import USER_TYPES, UserType


@dataclasses.dataclass(frozen=True, slots=True)
class AddResult:
    first_for_user: bool
    replaced: Connection | None  # a local connection of the same user+device, now displaced


class Hub:
    __slots__ = ("_by_id", "_by_user", "_by_type")

    def __init__(self) -> None:
        self._by_id: dict[str, Connection] = {}
        self._by_user: dict[UserId, dict[DeviceId, Connection]] = {}
        self._by_type: dict[UserType, int] = dict.fromkeys(USER_TYPES, 0)

    def add(self, conn: Connection) -> AddResult:
        ident = conn.identity
        devices = self._by_user.get(ident.user_id)
        first = devices is None
        if devices is None:
            devices = self._by_user[ident.user_id] = {}
        replaced = devices.get(ident.device_id)
        if replaced is not None:
            self._forget(replaced)
        devices[ident.device_id] = conn
        self._by_id[conn.connection_id] = conn
        self._by_type[ident.user_type] += 1
        return AddResult(first, replaced)

    def remove(self, conn: Connection) -> bool:
        """Forget `conn` if it is still registered; True when its user has no local device left."""
        if self._by_id.get(conn.connection_id) is not conn:
            return False
        self._forget(conn)
        devices = self._by_user.get(conn.identity.user_id)
        if devices is None:
            return False
        if devices.get(conn.identity.device_id) is conn:
            del devices[conn.identity.device_id]
        if not devices:
            del self._by_user[conn.identity.user_id]
            return True
        return False

    def _forget(self, conn: Connection) -> None:
        if self._by_id.pop(conn.connection_id, None) is not None:
            self._by_type[conn.identity.user_type] -= 1

    def get(self, connection_id: str) -> Connection | None:
        return self._by_id.get(connection_id)

    def devices(self, user_id: str) -> dict[DeviceId, Connection] | None:
        return self._by_user.get(UserId(user_id))

    def users(self) -> list[str]:
        """A snapshot: callers await between users while connections come and go."""
        return list(self._by_user)

    def has_user(self, user_id: str) -> bool:
        return user_id in self._by_user

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    @property
    def unique_users(self) -> int:
        return len(self._by_user)

    def by_user_type(self) -> dict[UserType, int]:
        return dict(self._by_type)
