"""The one admission check: every refusal, on either transport, counted alike."""

from __future__ import annotations

import pytest
import trio

from trioserve import CloseCode, Config
from trioserve.net.admission import AT_CAPACITY, DRAINING, OVER_PER_IP, Admission, IdleScopes, peer_key


def admission(connections: set[object] | None = None, **config: object) -> Admission:
    adm = Admission(Config(**config), set() if connections is None else connections)  # type: ignore[arg-type]
    adm.max_connections = adm.max_connections or 100
    return adm


def test_an_open_server_admits() -> None:
    adm = admission()
    assert adm.refusal("10.0.0.1:5000") is None
    assert adm.rejected == 0


def test_draining_refuses_and_counts() -> None:
    adm = admission()
    adm.draining = True
    assert adm.refusal("10.0.0.1:5000") is DRAINING
    assert adm.refusal(None) is DRAINING
    assert adm.rejected == 2
    assert DRAINING.code == CloseCode.GOING_AWAY and DRAINING.retry_after is None


def test_capacity_counts_connections_and_reserved_upgrades() -> None:
    conns: set[object] = {object()}
    adm = admission(conns, max_connections=2)
    assert adm.refusal(None) is None
    adm.reserve()  # an upgrade between its check and its connection
    assert adm.refusal(None) is AT_CAPACITY
    assert adm.rejected == 1
    adm.release()
    assert adm.refusal(None) is None
    assert AT_CAPACITY.code == CloseCode.TRY_AGAIN_LATER and AT_CAPACITY.retry_after == 1
    assert AT_CAPACITY.reason == "server at capacity"  # the 1013 reason docs/protocol.md names


async def test_per_ip_limit_counts_open_sockets_from_one_address() -> None:
    # async: a refusal is logged at most once a minute, by trio's clock.
    adm = admission(max_connections_per_ip=2)
    keys = [adm.count_peer("203.0.113.9:1000"), adm.count_peer("203.0.113.9:1001")]
    assert adm.refusal("203.0.113.9:1001") is None  # two open, two allowed
    keys.append(adm.count_peer("203.0.113.9:1002"))
    assert adm.refusal("203.0.113.9:1002") is OVER_PER_IP
    assert adm.refusal("203.0.113.10:1000") is None  # another address
    assert adm.rejected == 1
    for key in keys:
        adm.release_peer(key)
    assert adm._per_ip == {}


def test_loopback_is_exempt_from_the_default_per_ip_limit() -> None:
    adm = admission()
    assert adm.count_peer("127.0.0.1:5000") is None
    assert adm.refusal("127.0.0.1:5000") is None


def test_the_fd_budget_refuses_sockets_past_it() -> None:
    adm = admission()
    adm.fd_budget = 2
    assert adm.take_socket() and adm.take_socket()
    assert not adm.take_socket()
    assert (adm.sockets, adm.rejected) == (2, 1)
    adm.release_socket()
    assert adm.take_socket()


def test_peer_keys_group_ipv6_by_64() -> None:
    assert peer_key("[2001:db8:1:2::1]:443") == peer_key("[2001:db8:1:2:ffff::9]:443")
    assert peer_key("[2001:db8:1:2::1]:443") != peer_key("[2001:db8:1:3::1]:443")
    assert peer_key("[::ffff:198.51.100.1]:80") == ("198.51.100.1", False)


@pytest.mark.parametrize("closed_first", [False, True])
async def test_idle_scopes_are_cancelled_by_close(closed_first: bool) -> None:
    scopes = IdleScopes()
    if closed_first:
        scopes.close()
    scope = scopes.open(trio.current_time() + 100)
    with scope:
        if not closed_first:
            scopes.close()
        await trio.sleep_forever()
    assert scope.cancelled_caught
    scopes.discard(scope)
