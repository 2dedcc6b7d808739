"""Public keys for the token-key checks, made once per run: RSA key generation is slow."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .helpers import public_pem


@pytest.fixture(scope="session")
def rsa_pem() -> str:
    return public_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="session")
def ec_pem() -> str:
    return public_pem(ec.generate_private_key(ec.SECP256R1()))
