"""Brokers: where offsets are assigned and publications travel between processes.

The hub above is the same for every broker. A broker assigns each topic's
offsets and epoch, and hands publications to ``hub.deliver_nowait`` in offset
order: the memory broker does it in-process, the Redis broker through Redis
pub/sub, so every node of a cluster sees the same offsets.
"""

from __future__ import annotations

from ...config import Config
from .base import Broker, BrokerUnavailable, HubPort

__all__ = ["Broker", "BrokerUnavailable", "HubPort", "make_broker"]


def make_broker(config: Config) -> Broker:
    """The broker *config* names (``broker = "memory://"`` or ``"redis://..."``)."""
    url = getattr(config, "broker", "memory://") or "memory://"
    # Schemes are case-insensitive (RFC 3986), as the config's check takes them.
    if url.lower().startswith(("redis://", "rediss://")):
        try:
            from .redis import RedisBroker
        except ImportError as exc:
            raise RuntimeError(
                f"the Redis broker needs coredis: pip install 'trioserve[redis]' ({exc})"
            ) from None
        return RedisBroker(url, config)
    from .memory import MemoryBroker

    return MemoryBroker()
