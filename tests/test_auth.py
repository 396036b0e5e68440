"""JWT rules (contract section 1) on the pure verifier: every way a token must be refused."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.helpers import SECRET, make_token
from tornado_gateway.auth import ConnectParams, DeviceId, TokenVerifier, parse_connect_params
from tornado_gateway.config import ConfigError, Settings, validate
from tornado_gateway.errors import CloseCode, ErrorCode, GatewayError

HS = Settings(jwt_secret=SECRET)


def params(token: str, user_type: str = "driver") -> ConnectParams:
    return ConnectParams(token, user_type, DeviceId("d1"), "ios")  # type: ignore[arg-type]


def refusal(settings: Settings, token: str, user_type: str = "driver") -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        TokenVerifier(settings).identity(params(token, user_type))
    assert caught.value.code == ErrorCode.AUTH_FAILED
    assert caught.value.close_code == CloseCode.AUTH_FAILED
    return caught.value


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def rsa_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path_factory.mktemp("keys") / "rsa.pub.pem"
    path.write_bytes(public)
    return private, path


def claims(**extra: object) -> dict:
    now = int(time.time())
    return {"sub": "u1", "userType": "driver", "iat": now, "exp": now + 60, **extra}


def test_valid_token_gives_the_identity() -> None:
    identity = TokenVerifier(HS).identity(params(make_token("u1")))
    assert (identity.user_id, identity.user_type, identity.device_id, identity.platform) == ("u1", "driver", "d1",
                                                                                             "ios")


def test_alg_none_is_refused() -> None:
    token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}."
    refusal(HS, token)


def test_algorithm_outside_the_allow_list_is_refused() -> None:
    refusal(HS, jwt.encode(claims(), SECRET, algorithm="HS512"))


def test_hs256_token_signed_with_the_rsa_public_key_is_refused(rsa_keys: tuple[bytes, Path]) -> None:
    _private, public_path = rsa_keys
    settings = Settings(jwt_public_key_file=str(public_path), jwt_algorithms=("RS256",))
    refusal(settings, _hmac_token(public_path.read_text()))


def _hmac_token(key: str) -> str:
    """An HS256 token whose HMAC key is the PEM text: the classic key-confusion forgery."""
    import hashlib
    import hmac

    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(claims())}"
    signature = hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def test_rs256_token_is_accepted_with_the_public_key(rsa_keys: tuple[bytes, Path]) -> None:
    private, public_path = rsa_keys
    settings = Settings(jwt_public_key_file=str(public_path), jwt_algorithms=("RS256",))
    token = jwt.encode(claims(), private, algorithm="RS256")
    assert TokenVerifier(settings).identity(params(token)).user_id == "u1"


def test_es256_token_is_accepted_with_its_public_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = tmp_path / "ec.pub.pem"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    settings = Settings(jwt_public_key_file=str(public), jwt_algorithms=("ES256",))
    assert TokenVerifier(settings).identity(params(jwt.encode(claims(), key, algorithm="ES256"))).user_id == "u1"


def test_expired_token_is_refused() -> None:
    assert "expired" in refusal(HS, make_token(ttl_s=-1)).message


def test_token_not_valid_yet_is_refused() -> None:
    refusal(HS, jwt.encode(claims(nbf=int(time.time()) + 300), SECRET, algorithm="HS256"))


@pytest.mark.parametrize("claim", ["sub", "userType", "exp"])
def test_token_missing_a_required_claim_is_refused(claim: str) -> None:
    body = claims()
    del body[claim]
    refusal(HS, jwt.encode(body, SECRET, algorithm="HS256"))


@pytest.mark.parametrize("sub", [42, "", "x" * 129])
def test_sub_must_be_a_short_string(sub: object) -> None:
    refusal(HS, jwt.encode(claims(sub=sub), SECRET, algorithm="HS256"))


def test_user_type_claim_must_equal_the_parameter() -> None:
    refusal(HS, make_token("u1", "rider"), user_type="driver")


def test_issuer_and_audience_are_checked_when_configured() -> None:
    settings = dataclasses.replace(HS, jwt_issuer="ride-auth", jwt_audience="gateway")
    good = jwt.encode(claims(iss="ride-auth", aud="gateway"), SECRET, algorithm="HS256")
    assert TokenVerifier(settings).identity(params(good)).user_id == "u1"
    refusal(settings, jwt.encode(claims(iss="evil", aud="gateway"), SECRET, algorithm="HS256"))
    refusal(settings, jwt.encode(claims(iss="ride-auth", aud="other"), SECRET, algorithm="HS256"))
    refusal(settings, jwt.encode(claims(), SECRET, algorithm="HS256"))


@pytest.mark.parametrize("token", ["", "a.b", "a.b.c", "💥" * 10, "x" * 10000, "eyJ" * 3000])
def test_garbage_and_oversized_tokens_are_refused(token: str) -> None:
    refusal(HS, token)


def test_config_refuses_to_mix_hmac_and_public_key_algorithms(rsa_keys: tuple[bytes, Path]) -> None:
    with pytest.raises(ConfigError, match="mix"):
        validate(Settings(jwt_secret=SECRET, jwt_public_key_file=str(rsa_keys[1]),
                          jwt_algorithms=("HS256", "RS256")))


def test_bearer_header_is_used_when_the_query_has_no_token() -> None:
    query = {"userType": ["driver"], "deviceId": ["d"], "platform": ["web"]}
    assert parse_connect_params(query, "Bearer abc.def.ghi").token == "abc.def.ghi"
    assert parse_connect_params({**query, "token": ["q.q.q"]}, "Bearer abc.def.ghi").token == "q.q.q"
