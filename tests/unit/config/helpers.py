"""What the config tests share: a secret long enough for HS256, PEM public keys,
and the check that an error is one line and says what it should."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from trioserve.config import Config, ConfigError, load_config

SECRET = "unit-test-secret-0123456789-0123456789"


def public_pem(key: Any) -> str:
    return str(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())


def config_error(match: str, *, path: Path | None = None, env: Mapping[str, str] | None = None,
                 overrides: Mapping[str, Any] | None = None, **config: Any) -> str:
    """The one-line message of the ConfigError that loading (or Config(**config)) raises."""
    with pytest.raises(ConfigError) as info:
        if config:
            Config(**config)
        else:
            load_config(path, env or {}, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    assert re.search(match, message), message
    return message
