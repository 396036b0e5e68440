"""Who is connecting: query parameters and the JWT, turned into an Identity. Pure; raises GatewayError.

The algorithm allow-list is passed to PyJWT explicitly, which is what keeps
`alg: none` and HS/RS key confusion out: PyJWT only accepts algorithms the
caller names, and config.validate refuses to mix HMAC with public-key families.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, NewType

import jwt
from jwt.algorithms import HMACAlgorithm

from .config import Settings
from .errors import CloseCode, ErrorCode, GatewayError
from .messages import PLATFORMS, USER_TYPES, Platform, UserType

UserId = NewType("UserId", str)
DeviceId = NewType("DeviceId", str)

DEVICE_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}\Z")
MAX_TOKEN_LENGTH = 8192
MAX_USER_ID_LENGTH = 128


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectParams:
    token: str
    user_type: UserType
    device_id: DeviceId
    platform: Platform
    resume: Resume | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Resume:
    """`since` + `epoch` (PROTOCOL.md 7.2): the last recorded message the client handled."""

    since: int
    epoch: str


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    user_id: UserId
    user_type: UserType
    device_id: DeviceId
    platform: Platform
    expires_at: float  # seconds since the epoch, from the token's exp


def invalid_params(message: str) -> GatewayError:
    return GatewayError(ErrorCode.INVALID_PARAMS, message, close_code=CloseCode.INVALID_PARAMS)


def auth_failed(message: str) -> GatewayError:
    return GatewayError(ErrorCode.AUTH_FAILED, message, close_code=CloseCode.AUTH_FAILED)


def _single(query: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def parse_connect_params(query: Mapping[str, Sequence[str]], authorization: str | None,
                         subprotocols: Sequence[str] = ()) -> ConnectParams:
    """Query parameters are checked before the token (contract section 1)."""
    user_type = _single(query, "userType")
    if user_type not in USER_TYPES:
        raise invalid_params(f"userType must be one of {', '.join(USER_TYPES)}")
    device_id = _single(query, "deviceId")
    if device_id is None or not DEVICE_ID_RE.match(device_id):
        raise invalid_params("deviceId must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    platform = _single(query, "platform")
    if platform not in PLATFORMS:
        raise invalid_params(f"platform must be one of {', '.join(PLATFORMS)}")
    resume = parse_resume(_single(query, "since"), _single(query, "epoch"))
    token = _single(query, "token") or bearer_token(authorization) or subprotocol_token(subprotocols)
    if not token:
        raise auth_failed("token is missing: pass ?token=, an Authorization: Bearer header, or the "
                          f"subprotocols {SUBPROTOCOL} and {BEARER_PREFIX}<token>")
    return ConnectParams(token, user_type, DeviceId(device_id), platform, resume)


MAX_SINCE: Final = 2**53 - 1  # what every client language holds exactly
EPOCH_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")


def parse_resume(since: str | None, epoch: str | None) -> Resume | None:
    """Both or neither; `since` a decimal integer >= 0. Anything else is 4400, never a guess."""
    if since is None and epoch is None:
        return None
    if since is None or epoch is None:
        raise invalid_params("since and epoch must be given together")
    if not since.isascii() or not since.isdigit() or len(since) > 16 or int(since) > MAX_SINCE:
        raise invalid_params("since must be an integer >= 0 (the last seq the client handled)")
    if not EPOCH_RE.match(epoch):
        raise invalid_params("epoch must be the epoch from `connected` (1-64 characters of A-Z a-z 0-9 . _ : -)")
    return Resume(int(since), epoch)


#: Browsers cannot set headers on a WebSocket, and a token in the URL ends up in proxy access logs;
#: so a browser offers the subprotocols `tornado-gateway` and `bearer.<JWT>` (the way Kubernetes
#: carries tokens). The server selects `tornado-gateway`, never echoing the token.
SUBPROTOCOL: Final = "tornado-gateway"
BEARER_PREFIX: Final = "bearer."


def subprotocol_token(subprotocols: Sequence[str]) -> str | None:
    for offered in subprotocols:
        if offered.startswith(BEARER_PREFIX):
            return offered[len(BEARER_PREFIX):] or None
    return None


def bearer_token(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


class PreparedKeyHMAC(HMACAlgorithm):
    """PyJWT re-validates an HMAC secret (sniffing it for PEM, SSH and DER public keys) on every
    decode: 40% of what verifying a token costs, and 6% of a whole handshake. The gateway's
    secret never changes, so the validated key is kept (keyed by the secret it came from)."""

    def __init__(self, hash_alg: Any) -> None:
        super().__init__(hash_alg)
        self._prepared: tuple[str | bytes, bytes] | None = None

    def prepare_key(self, key: str | bytes) -> bytes:
        prepared = self._prepared
        if prepared is not None and prepared[0] == key:
            return prepared[1]
        key_bytes = super().prepare_key(key)
        self._prepared = (key, key_bytes)
        return key_bytes


HMAC_HASHES: dict[str, Any] = {"HS256": HMACAlgorithm.SHA256, "HS384": HMACAlgorithm.SHA384,
                               "HS512": HMACAlgorithm.SHA512}


def token_decoder(algorithms: list[str]) -> jwt.PyJWT:
    """A PyJWT of our own whose HMAC algorithms keep their prepared key. Its signature stage
    (`_jws`) is private: without it (another PyJWT), the stock algorithms are used."""
    decoder = jwt.PyJWT()
    jws = getattr(decoder, "_jws", None)
    if isinstance(jws, jwt.PyJWS):
        for name in algorithms:
            if name in HMAC_HASHES:
                jws.unregister_algorithm(name)
                jws.register_algorithm(name, PreparedKeyHMAC(HMAC_HASHES[name]))
    return decoder


class TokenVerifier:
    """Verifies tokens against the configured key, algorithms, issuer and audience."""

    __slots__ = ("_key", "_algorithms", "_issuer", "_audience", "_leeway_s", "_decoder")

    def __init__(self, settings: Settings, *, leeway_s: float = 0.0) -> None:
        self._key = settings.jwt_key
        self._algorithms = list(settings.jwt_algorithms)
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._leeway_s = leeway_s
        self._decoder = token_decoder(self._algorithms)

    def claims(self, token: str) -> dict[str, Any]:
        if len(token) > MAX_TOKEN_LENGTH:
            raise auth_failed("token is too large")
        try:
            claims = self._decoder.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway_s,
                options={"require": ["sub", "exp", "userType"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise auth_failed("token has expired") from None
        except jwt.ImmatureSignatureError:
            raise auth_failed("token is not valid yet") from None
        except jwt.MissingRequiredClaimError as exc:
            raise auth_failed(f"token is missing the {exc.claim} claim") from None
        except (jwt.InvalidIssuerError, jwt.InvalidAudienceError):
            raise auth_failed("token was issued for another issuer or audience") from None
        except jwt.InvalidAlgorithmError:
            raise auth_failed("token algorithm is not allowed") from None
        except jwt.InvalidSignatureError:
            raise auth_failed("token signature is invalid") from None
        except (jwt.InvalidTokenError, ValueError, TypeError, OverflowError):
            raise auth_failed("token is malformed") from None
        try:
            float(claims["exp"])
        except (TypeError, ValueError, OverflowError):
            raise auth_failed("token exp is not a number") from None
        return claims

    def identity(self, params: ConnectParams) -> Identity:
        claims = self.claims(params.token)
        return Identity(
            user_id=check_subject(claims),
            user_type=check_user_type(claims, params.user_type),
            device_id=params.device_id,
            platform=params.platform,
            expires_at=float(claims["exp"]),
        )


def check_subject(claims: Mapping[str, Any]) -> UserId:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not 0 < len(sub) <= MAX_USER_ID_LENGTH:
        raise auth_failed(f"token sub must be a string of 1..{MAX_USER_ID_LENGTH} characters")
    return UserId(sub)


def check_user_type(claims: Mapping[str, Any], expected: UserType) -> UserType:
    if claims.get("userType") != expected:
        raise auth_failed("token userType does not match the userType parameter")
    return expected


def mint_token(
    settings: Settings,
    user_id: str,
    user_type: UserType,
    *,
    ttl_s: float = 3600.0,
    private_key: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Issue a token the gateway accepts: for development, tests and the `token` command."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "userType": user_type, "iat": now, "exp": now + int(ttl_s)}
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    claims.update(extra or {})
    algorithm = settings.jwt_algorithms[0]
    key = private_key if private_key is not None else settings.jwt_secret
    if not key:
        raise ValueError(f"{algorithm} needs a private key to sign with (--private-key)")
    return jwt.encode(claims, key, algorithm=algorithm)
