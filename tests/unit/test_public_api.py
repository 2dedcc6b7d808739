"""The public API is what ``trioserve/__init__.py`` exports: these names, each
importable from the package face, each defined inside trioserve."""

from __future__ import annotations

import importlib

import trioserve

PUBLIC = {
    "AuthError", "Authenticator", "Claims", "CloseCode", "Command", "Config", "ConfigError",
    "Connection", "ConnectionClosed", "ConnectionState", "ConnectionStatistics", "ErrorCode",
    "Handler", "HistoryRule", "Hub", "HubClosed", "HubOverloaded", "HubStatistics", "OpHandler",
    "ProtocolError", "PublishResult", "Recovery", "Reject", "Request", "Response", "Server",
    "ServerStatistics", "SlowConsumerPolicy", "TcpConnection", "WebSocketConnection",
    "__version__", "load_config",
}


def test_exported_names_are_exactly_the_public_api() -> None:
    assert set(trioserve.__all__) == PUBLIC
    assert len(trioserve.__all__) == len(PUBLIC)  # no name listed twice


def test_every_exported_name_exists_and_comes_from_trioserve() -> None:
    for name in PUBLIC - {"__version__", "Handler", "OpHandler"}:
        obj = getattr(trioserve, name)
        assert obj.__module__.startswith("trioserve."), (name, obj.__module__)
    assert isinstance(trioserve.__version__, str)


def test_documented_module_paths_keep_working() -> None:
    # Import paths the docs name besides the package face.
    assert importlib.import_module("trioserve.config").load_config is trioserve.load_config
    assert importlib.import_module("trioserve.server").Server is trioserve.Server
    assert importlib.import_module("trioserve.server.metrics").server_registry is not None
    assert importlib.import_module("trioserve.client").connect is not None


def test_star_import_gives_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from trioserve import *", namespace)
    assert PUBLIC - {"__version__"} <= set(namespace)
