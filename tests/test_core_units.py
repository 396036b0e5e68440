"""The pure core without sockets: message validation, the hub, heartbeat timing, configuration."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from jwt.algorithms import HMACAlgorithm

from tornado_gateway.auth import DeviceId, Identity, PreparedKeyHMAC, TokenVerifier, UserId, mint_token, token_decoder
from tornado_gateway.config import DEV_JWT_SECRET, ConfigError, load_settings
from tornado_gateway.connection import Connection
from tornado_gateway.errors import ErrorCode, GatewayError, ValidationError
from tornado_gateway.flow import FlowControl
from tornado_gateway.heartbeat import MAX_BUCKETS, HeartbeatScheduler, bucket_plan, is_stale
from tornado_gateway.hub import Hub
from tornado_gateway.messages import (
    LOCATION_UPDATE_SCHEMA,
    IdGenerator,
    decode_client_frame,
    dumps,
    validate_payload,
    validate_service_message,
)


class NullTransport:
    def write_frame(self, data: str | bytes) -> bool:
        return True

    def close_transport(self, code: int, reason: str) -> None:
        return None

    def buffered_bytes(self) -> int:
        return 0


def conn(connection_id: str, user: str, device: str, user_type: str = "rider") -> Connection:
    identity = Identity(UserId(user), user_type, DeviceId(device), "ios", 0.0)  # type: ignore[arg-type]
    return Connection(connection_id, identity, NullTransport(), "127.0.0.1")


# --- messages ---------------------------------------------------------------------------------

@pytest.mark.parametrize("frame", ["NaN", '{"type": "x", "payload": {"a": NaN}}'])
def test_nan_never_passes_validation(frame: str) -> None:
    with pytest.raises(ValidationError):
        message = decode_client_frame(frame)
        validate_payload(LOCATION_UPDATE_SCHEMA, {"latitude": message["payload"]["a"], "longitude": 0,
                                                  "timestamp": 1})


def test_infinity_latitude_is_invalid() -> None:
    with pytest.raises(ValidationError, match="finite"):
        validate_payload(LOCATION_UPDATE_SCHEMA, {"latitude": float("inf"), "longitude": 0, "timestamp": 1})


def test_deeply_nested_frame_is_invalid_json_or_message_never_a_crash() -> None:
    with pytest.raises(ValidationError) as caught:
        decode_client_frame("[" * 100000 + "]" * 100000)
    assert caught.value.code in (ErrorCode.INVALID_JSON, ErrorCode.INVALID_MESSAGE)


def test_client_id_must_be_a_short_string() -> None:
    with pytest.raises(ValidationError):
        decode_client_frame('{"type": "heartbeat_ack", "payload": {}, "id": 5}')
    with pytest.raises(ValidationError):
        decode_client_frame('{"type": "heartbeat_ack", "payload": {}, "id": "' + "x" * 200 + '"}')


def test_service_message_without_required_fields_names_them() -> None:
    with pytest.raises(ValidationError, match="rideId, status"):
        validate_service_message({"type": "ride_status", "payload": {}})


def test_service_message_passes_extra_fields_through() -> None:
    kind, payload, ref, stamp = validate_service_message(
        {"type": "order_status", "payload": {"orderId": "o", "status": "ready", "items": [1]}, "id": "i"})
    assert (kind, payload["items"], ref, stamp) == ("order_status", [1], "i", None)


def test_dumps_refuses_nan() -> None:
    with pytest.raises(OverflowError):
        dumps({"x": float("nan")})


def test_message_ids_are_unique_and_carry_the_server_id() -> None:
    ids = IdGenerator("srv")
    produced = {ids.next() for _ in range(1000)}
    assert len(produced) == 1000
    assert all(i.startswith("srv-") for i in produced)


# --- hub --------------------------------------------------------------------------------------

def test_hub_reports_first_and_last_device_of_a_user() -> None:
    hub = Hub()
    a, b = conn("1", "u", "phone"), conn("2", "u", "web")
    assert hub.add(a).first_for_user
    assert not hub.add(b).first_for_user
    assert not hub.remove(a)
    assert hub.remove(b)
    assert len(hub) == 0 and hub.unique_users == 0


def test_hub_replaces_the_same_device_and_keeps_counts_right() -> None:
    hub = Hub()
    old, new = conn("1", "u", "phone", "driver"), conn("2", "u", "phone", "driver")
    hub.add(old)
    result = hub.add(new)
    assert result.replaced is old and not result.first_for_user
    assert hub.by_user_type()["driver"] == 1
    assert not hub.remove(old)  # the displaced one is already gone
    assert hub.remove(new)
    assert hub.by_user_type()["driver"] == 0


# --- heartbeats -------------------------------------------------------------------------------

@pytest.mark.parametrize("interval_s", [0.05, 0.2, 1, 30, 300])
def test_bucket_plan_covers_the_interval(interval_s: float) -> None:
    buckets, tick_ms = bucket_plan(interval_s)
    assert 1 <= buckets <= MAX_BUCKETS
    assert buckets * tick_ms == pytest.approx(interval_s * 1000)


def test_thirty_second_interval_spreads_over_a_hundred_buckets() -> None:
    assert bucket_plan(30) == (100, 300.0)


def test_stale_means_silent_for_longer_than_the_timeout() -> None:
    assert not is_stale(last_seen=100.0, now=175.0, timeout_s=75)
    assert is_stale(last_seen=100.0, now=175.1, timeout_s=75)


# --- configuration ----------------------------------------------------------------------------

def test_defaults_match_the_contract() -> None:
    settings = load_settings({"JWT_SECRET": "s"})
    assert (settings.port, settings.redis_url, settings.heartbeat_interval_s, settings.heartbeat_timeout_s,
            settings.max_message_size, settings.instance_ttl_s, settings.statsd_host, settings.statsd_port,
            settings.statsd_prefix, settings.processes, settings.jwt_algorithms) == (
        4010, "redis://localhost:6379", 30.0, 75.0, 65536, 15.0, "localhost", 8125, "gateway", 1, ("HS256",))


def test_missing_secret_refuses_to_start_with_a_clear_message() -> None:
    with pytest.raises(ConfigError, match="JWT_SECRET"):
        load_settings({})


def test_dev_mode_uses_the_insecure_dev_secret() -> None:
    assert load_settings({}, dev=True).jwt_secret == DEV_JWT_SECRET


def test_environment_overrides_the_conf_file(tmp_path: Path) -> None:
    conf = tmp_path / "x.conf"
    conf.write_text('port = 5000\nheartbeat_interval = 10\njwt_secret = "from-file"\n')
    settings = load_settings({"PORT": "6000"}, conf_file=str(conf))
    assert (settings.port, settings.heartbeat_interval_s, settings.jwt_secret) == (6000, 10.0, "from-file")


def test_fractional_heartbeats_are_allowed() -> None:
    settings = load_settings({"JWT_SECRET": "s", "HEARTBEAT_INTERVAL": "0.2", "HEARTBEAT_TIMEOUT": "0.5"})
    assert (settings.heartbeat_interval_s, settings.heartbeat_timeout_s) == (0.2, 0.5)


@pytest.mark.parametrize("env", [{"PORT": "abc"}, {"HEARTBEAT_TIMEOUT": "1", "HEARTBEAT_INTERVAL": "2"},
                                 {"JWT_ALGORITHMS": "none"}, {"JWT_ALGORITHMS": "RS256"}, {"PROCESSES": "0"}])
def test_bad_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        load_settings({"JWT_SECRET": "s", **env})


@pytest.mark.parametrize("name", ["development.conf", "production.conf"])
def test_shipped_conf_files_load(name: str) -> None:
    conf = Path(__file__).resolve().parent.parent / "conf" / name
    assert load_settings({"JWT_SECRET": "s", "GATEWAY_API_KEY": "k"}, conf_file=str(conf)).port == 4010


def test_a_verifier_that_kept_its_prepared_key_still_refuses_tokens_signed_with_another_secret() -> None:
    settings = load_settings(env={"JWT_SECRET": "k" * 40, "JWT_ALGORITHMS": "HS256,HS512"})
    verifier = TokenVerifier(settings)
    good = mint_token(settings, "u1", "driver")
    forged = jwt.encode({"sub": "u1", "userType": "driver", "exp": int(time.time()) + 60}, "x" * 40)
    assert verifier.claims(good)["sub"] == "u1"
    with pytest.raises(GatewayError, match="signature is invalid"):
        verifier.claims(forged)
    assert verifier.claims(good)["sub"] == "u1"  # the kept key is the configured one, not the last seen


def test_token_verification_keeps_the_prepared_hmac_key() -> None:
    """Guards the handshake fast path: a PyJWT upgrade that drops the hook would silently slow it."""
    decoder = token_decoder(["HS256", "RS256"])
    assert isinstance(decoder._jws.get_algorithm_by_name("HS256"), PreparedKeyHMAC)


class CongestedTransport(NullTransport):
    """A socket with 100 KB queued whose drain callback fires at once (as when it just closed)."""

    def __init__(self) -> None:
        self.written: list[str | bytes] = []

    def write_frame(self, data: str | bytes) -> bool:
        self.written.append(data)
        return True

    def buffered_bytes(self) -> int:
        return 100 * 1024

    def on_drained(self, callback: Callable[[], None]) -> None:
        callback()


def test_a_latest_wins_frame_survives_a_drain_callback_that_fires_at_once() -> None:
    transport = CongestedTransport()
    c = Connection("c1", Identity(UserId("u"), "rider", DeviceId("d"), "ios", 0.0), transport, "127.0.0.1")
    c.write_first(b"connected")
    c.release_held()
    flow = FlowControl(max_buffer=1024 * 1024, on_slow=lambda _c, _b: None, on_coalesced=lambda: None)
    flow.deliver(c, b"position-1", "driver_location:d1")
    assert transport.written == [b"connected", b"position-1"]
    assert c.coalesced is None


def test_frames_sent_before_connected_follow_it_in_order() -> None:
    transport = CongestedTransport()
    c = Connection("c1", Identity(UserId("u"), "rider", DeviceId("d"), "ios", 0.0), transport, "127.0.0.1")
    c.send(b"early-1")
    c.send(b"early-2")
    assert transport.written == []
    c.write_first(b"connected")
    c.release_held()
    assert transport.written == [b"connected", b"early-1", b"early-2"]


def test_a_prepared_hmac_key_is_kept_per_secret() -> None:
    hs256 = PreparedKeyHMAC(HMACAlgorithm.SHA256)
    assert hs256.prepare_key("a" * 40) == b"a" * 40
    assert hs256.prepare_key("b" * 40) == b"b" * 40
    assert hs256.prepare_key("a" * 40) == b"a" * 40


def test_a_warm_verifier_does_not_make_another_secret_accept_its_tokens() -> None:
    first = load_settings(env={"JWT_SECRET": "a" * 40})
    second = load_settings(env={"JWT_SECRET": "b" * 40})
    token = mint_token(first, "u1", "driver")
    assert TokenVerifier(first).claims(token)["sub"] == "u1"
    with pytest.raises(GatewayError, match="signature is invalid"):
        TokenVerifier(second).claims(token)


def test_only_the_configured_hmac_algorithms_are_accepted() -> None:
    settings = load_settings(env={"JWT_SECRET": "k" * 64, "JWT_ALGORITHMS": "HS256,HS512"})
    verifier = TokenVerifier(settings)
    claims = {"sub": "u1", "userType": "driver", "exp": int(time.time()) + 60}
    assert verifier.claims(jwt.encode(claims, "k" * 64, algorithm="HS512"))["sub"] == "u1"
    with pytest.raises(GatewayError, match="algorithm is not allowed"):
        verifier.claims(jwt.encode(claims, "k" * 64, algorithm="HS384"))


class ClosingLimit:
    """An outbound limit that every client exceeds: each heartbeat send closes its connection."""

    def __init__(self, scheduler: HeartbeatScheduler) -> None:
        self.scheduler = scheduler

    def admits(self, connection: Connection, size: int) -> bool:
        self.scheduler.remove(connection)
        return False


def test_a_heartbeat_tick_survives_clients_closed_by_the_outbound_limit_while_it_runs() -> None:
    scheduler = HeartbeatScheduler(0.02, 10.0, IdGenerator("gw"), on_stale=lambda c: None)
    limit = ClosingLimit(scheduler)
    clients = [conn(f"c{n}", f"u{n}", "d") for n in range(3)]
    for client in clients:
        client.outbound = limit
        client.opening = None
        scheduler.add(client)
    scheduler.tick()
    assert all(client.bucket == -1 for client in clients)


# --- gaps in recorded messages (PROTOCOL.md 7.4) ----------------------------------------------


def positioned(epoch: str | None = None, last_seq: int = 0, *, opening: bool = False) -> Connection:
    """A connected device that has seen recorded messages of `epoch` up to `last_seq`."""
    c = conn("c1", "u", "d")
    c.epoch, c.last_seq = epoch, last_seq
    if not opening:
        c.opening = None
    return c


def test_the_next_seq_is_no_gap() -> None:
    assert not positioned("e1", 4).misses("e1", 5)


def test_a_seq_past_the_next_one_is_a_gap() -> None:
    assert positioned("e1", 4).misses("e1", 7)


def test_a_new_epochs_first_message_is_no_gap_but_a_later_one_is() -> None:
    assert not positioned("e1", 4).misses("e2", 1)
    assert positioned("e1", 4).misses("e2", 3)


def test_a_device_without_a_position_or_still_opening_never_sees_a_gap() -> None:
    assert not positioned(None).misses("e1", 9)
    assert not positioned("e1", 1, opening=True).misses("e1", 9)
