"""make_broker (trioserve/push/brokers/__init__.py): the broker a config names."""

from __future__ import annotations

import pytest

from trioserve.config import Config
from trioserve.push.brokers import make_broker
from trioserve.push.brokers.memory import MemoryBroker
from trioserve.push.brokers.redis import RedisBroker


def test_memory_is_the_default() -> None:
    assert isinstance(make_broker(Config()), MemoryBroker)
    assert isinstance(make_broker(Config(broker="memory://")), MemoryBroker)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://cache.example:6380/1"])
def test_a_redis_url_makes_a_redis_broker_without_connecting(url: str) -> None:
    # Connecting is the broker's run(), under the server's nursery; making one does no I/O.
    broker = make_broker(Config(broker=url))
    assert isinstance(broker, RedisBroker) and broker.url == url
    assert not broker.synchronous and not broker.connected.is_set()


# The config accepts a scheme in any case; a memory broker here would give each
# of two workers its own hub.
@pytest.mark.parametrize("url", ["REDIS://127.0.0.1:6379/0", "Rediss://cache.example:6380/1"])
def test_the_scheme_is_case_insensitive_as_in_the_config(url: str) -> None:
    assert isinstance(make_broker(Config(broker=url, workers=2)), RedisBroker)
