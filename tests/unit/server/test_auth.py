"""The JWT matrix: every way a token can be wrong gets its own named error."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trioserve.protocol.claims import AuthError
from trioserve.server.auth import Authenticator

SECRET = "s3cret-for-tests-only-0123456789abcdef"


def hs_token(payload: dict[str, Any] | None = None, key: str = SECRET, alg: str = "HS256",
             **claims: Any) -> str:
    # A long expiry: some tokens are built at import time, long before their test runs.
    body = {"sub": "alice", "exp": int(time.time()) + 3600, **(payload or {}), **claims}
    return jwt.encode(body, key, algorithm=alg)


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[Any, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return key, public


@pytest.fixture(scope="module")
def ec_keys() -> tuple[Any, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return key, public


def code_of(auth: Authenticator, token: str) -> str:
    with pytest.raises(AuthError) as info:
        auth.verify(token)
    return info.value.code


def test_valid_hs256_token_gives_claims() -> None:
    auth = Authenticator(secret=SECRET)
    claims = auth.verify(hs_token(subscribe=["chat.*"], publish=["chat.lobby"], presence=True))
    assert claims.sub == "alice" and not claims.anonymous
    assert claims.may_subscribe("chat.x") and not claims.may_subscribe("news")
    assert claims.may_publish("chat.lobby") and not claims.may_publish("chat.other")
    assert claims.presence


def test_defaults_of_a_token_without_permissions() -> None:
    claims = Authenticator(secret=SECRET).verify(hs_token())
    assert not claims.may_subscribe("anything") and not claims.may_publish("x") and not claims.presence


def test_expired() -> None:
    assert code_of(Authenticator(secret=SECRET), hs_token(exp=int(time.time()) - 5)) == "token_expired"


def test_not_yet_valid() -> None:
    token = hs_token(nbf=int(time.time()) + 3600)
    assert code_of(Authenticator(secret=SECRET), token) == "token_not_yet_valid"


def test_wrong_signature() -> None:
    token = hs_token(key="another-secret-of-sufficient-length-1234")
    assert code_of(Authenticator(secret=SECRET), token) == "bad_signature"


def test_alg_none_is_refused() -> None:
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT"}).encode()).rstrip(b"=")
    body = base64.urlsafe_b64encode(
        json.dumps({"sub": "mallory", "exp": int(time.time()) + 60}).encode()
    ).rstrip(b"=")
    token = (header + b"." + body + b".").decode()
    assert code_of(Authenticator(secret=SECRET), token) == "algorithm_not_allowed"


def test_hs_rs_confusion_is_refused(rsa_keys: tuple[Any, str]) -> None:
    _, public = rsa_keys
    # The classic attack: an HMAC token "signed" with the server's public key.
    forged = jwt.api_jws.PyJWS(algorithms=["HS256"])  # bypass PyJWT's own guard to build it
    forged._algorithms["HS256"].prepare_key = lambda key: key  # type: ignore[attr-defined]
    token = forged.encode(json.dumps({"sub": "mallory", "exp": int(time.time()) + 60}).encode(),
                          public.encode(), algorithm="HS256")
    assert code_of(Authenticator(public_key=public), token) == "algorithm_not_allowed"


def test_rs256_and_es256(rsa_keys: tuple[Any, str], ec_keys: tuple[Any, str]) -> None:
    body = {"sub": "bob", "exp": int(time.time()) + 60, "subscribe": ["*"]}
    rsa_private, rsa_public = rsa_keys
    assert Authenticator(public_key=rsa_public).verify(jwt.encode(body, rsa_private, "RS256")).sub == "bob"
    ec_private, ec_public = ec_keys
    assert Authenticator(public_key=ec_public).verify(jwt.encode(body, ec_private, "ES256")).sub == "bob"
    # A token signed by some other RSA key does not verify.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert code_of(Authenticator(public_key=rsa_public), jwt.encode(body, other, "RS256")) == "bad_signature"


def test_audience_and_issuer() -> None:
    auth = Authenticator(secret=SECRET, audience="trioserve", issuer="https://auth.example")
    good = hs_token(aud="trioserve", iss="https://auth.example")
    assert auth.verify(good).sub == "alice"
    assert code_of(auth, hs_token(aud="someone-else", iss="https://auth.example")) == "wrong_audience"
    assert code_of(auth, hs_token(aud="trioserve", iss="https://evil.example")) == "wrong_issuer"


@pytest.mark.parametrize(
    ("token", "code"),
    [
        ("", "token_missing"),
        ("not-a-jwt", "token_invalid"),
        (jwt.encode({"exp": int(time.time()) + 60}, SECRET, "HS256"), "token_invalid"),  # no sub
        (jwt.encode({"sub": "a"}, SECRET, "HS256"), "token_invalid"),  # no exp
        (hs_token(subscribe="not-a-list-but-a-str") + "x", "bad_signature"),
        (hs_token(subscribe=[1, 2]), "token_invalid"),
        (hs_token(sub=""), "token_invalid"),
    ],
)
def test_malformed_tokens(token: str, code: str) -> None:
    assert code_of(Authenticator(secret=SECRET), token) == code


def test_key_and_algorithm_must_match() -> None:
    with pytest.raises(ValueError):
        Authenticator(secret=SECRET, algorithms=["RS256"])
    with pytest.raises(ValueError):
        Authenticator(public_key="pem", algorithms=["HS256"])
    with pytest.raises(ValueError):
        Authenticator(secret=SECRET, algorithms=["none"])
    with pytest.raises(ValueError):
        Authenticator()
