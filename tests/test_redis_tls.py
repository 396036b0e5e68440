"""rediss:// URLs: the gateway's own Redis connections trust exactly what redis-py trusts with the same URL.

The pub/sub listener and the pipelined commands run on the gateway's bare RESP connection, not on redis-py,
so the gateway tests check both: /ready (the listener), a presence entry (written by a pipelined script) and
a PUBLISH reaching a WebSocket client. Every test owns a TLS-only redis-server and certificates made with the
openssl CLI; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.helpers import GatewayProcess, eventually, free_port, unique
from tornado_gateway.resp import RespConnection

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
CLIENT_KEY_PASSWORD = "client-key-pass"
NOTIFICATION = {"type": "notification", "payload": {"title": "t", "body": "b"}}


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path  # encrypted with CLIENT_KEY_PASSWORD, so ssl_password is exercised too
    self_signed_cert: Path
    self_signed_key: Path
    elsewhere_cert: Path  # signed by the CA, but for another host
    elsewhere_key: Path


def openssl(directory: Path, *args: str) -> None:
    subprocess.run([OPENSSL, *args], cwd=directory, check=True, capture_output=True)


def ec_key_args(key: Path) -> list[str]:
    """EC keys: generated in milliseconds, where RSA keys would cost the module seconds."""
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-keyout", str(key)]


def issue(directory: Path, name: str, extensions: str, *, key_password: str | None = None) -> tuple[Path, Path]:
    """A certificate signed by the private CA in `directory`, with the extensions a strict verifier wants."""
    cert, key, csr, ext = (directory / f"{name}{suffix}" for suffix in (".pem", ".key", ".csr", ".ext"))
    ext.write_text(f"{extensions}\nbasicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid,issuer\n")
    protect = ["-passout", f"pass:{key_password}"] if key_password else ["-nodes"]
    openssl(directory, "req", "-new", *ec_key_args(key), *protect, "-subj", f"/CN={name}", "-out", str(csr))
    openssl(directory, "x509", "-req", "-in", str(csr), "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", str(random.getrandbits(63)), "-days", "2", "-extfile", str(ext), "-out", str(cert))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    openssl(directory, "req", "-x509", *ec_key_args(directory / "ca.key"), "-nodes", "-days", "2",
            "-subj", "/CN=gateway test CA", "-out", "ca.pem",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    server_cert, server_key = issue(directory, "server",
                                    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    client_cert, client_key = issue(directory, "client", "extendedKeyUsage=clientAuth",
                                    key_password=CLIENT_KEY_PASSWORD)
    openssl(directory, "req", "-x509", *ec_key_args(directory / "self.key"), "-nodes", "-days", "2",
            "-subj", "/CN=localhost", "-out", "self.pem", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost")
    elsewhere_cert, elsewhere_key = issue(directory, "elsewhere",
                                          "subjectAltName=DNS:elsewhere.example\nextendedKeyUsage=serverAuth")
    return Pki(directory / "ca.pem", server_cert, server_key, client_cert, client_key,
               directory / "self.pem", directory / "self.key", elsewhere_cert, elsewhere_key)


class TlsRedis:
    """A TLS-only redis-server (no plaintext port), stopped by its pid."""

    def __init__(self, cert: Path, key: Path, ca: Path, auth_clients: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
             "--tls-auth-clients", auth_clients, "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def url(self, **options: str | Path) -> str:
        query = "&".join(f"{name}={value}" for name, value in options.items())
        return f"rediss://127.0.0.1:{self.port}" + (f"?{query}" if query else "")

    def wait_until_serving(self, url: str) -> None:
        """Through redis-py with `url`: which also shows that redis-py accepts the URL the gateway gets."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with redis.Redis.from_url(url, socket_connect_timeout=0.5) as client:
                    if client.ping():
                        return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("the TLS redis-server did not answer")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def tls_redis() -> Iterator[Callable[..., TlsRedis]]:
    started: list[TlsRedis] = []

    def start(cert: Path, key: Path, ca: Path, *, auth_clients: str = "optional") -> TlsRedis:
        server = TlsRedis(cert, key, ca, auth_clients)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


async def ready_status(gateway: GatewayProcess) -> int:
    return (await gateway.http("GET", "/ready"))[0]


async def assert_gateway_serves_over(url: str, make_gateway: Callable[..., GatewayProcess]) -> None:
    """Ready, a client connects (its presence entry is a pipelined script), and a PUBLISH reaches it."""
    gateway = make_gateway(url=url)
    assert await ready_status(gateway) == 200
    user = unique()
    client = await gateway.connect(user)
    publisher = redis.Redis.from_url(url)
    try:
        await eventually(lambda: publisher.hexists(f"{gateway.prefix}:presence:{user}", "d1"))
        assert publisher.publish(f"{gateway.prefix}:user:{user}", json.dumps(NOTIFICATION)) == 1
        frame = await client.recv("notification")
        assert frame["payload"]["title"] == "t"
        assert frame["payload"]["body"] == "b"
    finally:
        client.close()
        publisher.close()


async def test_gateway_trusts_a_private_ca_named_in_the_url(
        pki: Pki, tls_redis: Callable[..., TlsRedis], make_gateway: Callable[..., GatewayProcess]) -> None:
    server = tls_redis(pki.server_cert, pki.server_key, pki.ca)
    url = server.url(ssl_ca_certs=pki.ca)  # hostname checking on: redis-py's default, against IP:127.0.0.1
    server.wait_until_serving(url)
    await assert_gateway_serves_over(url, make_gateway)


async def test_gateway_presents_the_client_certificate_named_in_the_url(
        pki: Pki, tls_redis: Callable[..., TlsRedis], make_gateway: Callable[..., GatewayProcess]) -> None:
    server = tls_redis(pki.server_cert, pki.server_key, pki.ca, auth_clients="yes")
    url = server.url(ssl_ca_certs=pki.ca, ssl_certfile=pki.client_cert, ssl_keyfile=pki.client_key,
                     ssl_password=CLIENT_KEY_PASSWORD)
    server.wait_until_serving(url)
    await assert_gateway_serves_over(url, make_gateway)


async def test_gateway_accepts_a_self_signed_server_when_the_url_says_cert_reqs_none(
        pki: Pki, tls_redis: Callable[..., TlsRedis], make_gateway: Callable[..., GatewayProcess]) -> None:
    server = tls_redis(pki.self_signed_cert, pki.self_signed_key, pki.self_signed_cert, auth_clients="no")
    url = server.url(ssl_cert_reqs="none")
    server.wait_until_serving(url)
    await assert_gateway_serves_over(url, make_gateway)


async def test_gateway_stays_unready_and_logs_only_warnings_when_it_cannot_verify_redis(
        pki: Pki, tls_redis: Callable[..., TlsRedis], make_gateway: Callable[..., GatewayProcess]) -> None:
    server = tls_redis(pki.server_cert, pki.server_key, pki.ca)
    server.wait_until_serving(server.url(ssl_ca_certs=pki.ca))
    gateway = make_gateway(url=server.url(ssl_cert_reqs="required"), wait_ready=False)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        assert await ready_status(gateway) == 503
        await asyncio.sleep(0.2)
    log = gateway.log()
    assert "CERTIFICATE_VERIFY_FAILED" in log
    assert "Traceback" not in log, log


async def test_hostname_is_checked_as_redis_py_checks_it_unless_the_url_turns_it_off(
        pki: Pki, tls_redis: Callable[..., TlsRedis]) -> None:
    """The gateway's own connection, without a gateway: the certificate is the CA's, for another host."""
    server = tls_redis(pki.elsewhere_cert, pki.elsewhere_key, pki.ca)
    unchecked = server.url(ssl_ca_certs=pki.ca, ssl_check_hostname="false")
    server.wait_until_serving(unchecked)
    checked = server.url(ssl_ca_certs=pki.ca)
    with pytest.raises(redis.exceptions.ConnectionError, match="mismatch"), redis.Redis.from_url(checked) as client:
        client.ping()
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        await RespConnection(checked).connect()
    conn = RespConnection(unchecked)
    await conn.connect()
    try:
        conn.send("PING")
        assert await conn.read_replies() == [b"PONG"]
    finally:
        conn.close()
