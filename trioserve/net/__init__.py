"""2. The network layer: trio I/O that knows no topics.

Transports and TLS, listeners and the fd budget, admission, :class:`Connection`
with its WebSocket and TCP kinds, the heartbeat sweep, and the h11 HTTP driver.
"""
