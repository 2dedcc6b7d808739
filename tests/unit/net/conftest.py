"""Connection tests run over both transports unless they need one in particular."""

from __future__ import annotations

import pytest

from ..helpers import PairFactory, memory_pair, socket_pair


@pytest.fixture(params=["socket", "memory"])
def pair(request: pytest.FixtureRequest) -> PairFactory:
    return socket_pair if request.param == "socket" else memory_pair
