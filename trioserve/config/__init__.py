"""Settings, at the bottom of the house: every layer reads them, and they import
nothing else of trioserve.

- :mod:`.checks`: the validators and the constants they check against;
- :mod:`.model`: :class:`Config`, every default in one place;
- :mod:`.sources`: a Config from a TOML file, ``TRIOSERVE_*`` variables and flags.
"""

from __future__ import annotations

from .checks import (
    BROKER_SCHEMES,
    DEFAULT_MAX_CONNECTIONS_PER_IP,
    HMAC_ALGORITHMS,
    LOG_FORMATS,
    LOG_LEVELS,
    PUBLIC_KEY_ALGORITHMS,
    ConfigError,
    HistoryRule,
    SlowConsumerPolicy,
    check_topic_pattern,
    redact_url,
)
from .model import Config
from .sources import load_config

__all__ = [
    "BROKER_SCHEMES",
    "DEFAULT_MAX_CONNECTIONS_PER_IP",
    "HMAC_ALGORITHMS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "PUBLIC_KEY_ALGORITHMS",
    "Config",
    "ConfigError",
    "HistoryRule",
    "SlowConsumerPolicy",
    "check_topic_pattern",
    "load_config",
    "redact_url",
]
