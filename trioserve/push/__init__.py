"""3. The push domain, which knows no sockets: the hub and its fan-out, history,
brokers, the publish service, the push protocol handler and the HTTP API.

It sees a connection only through the narrow protocols it declares
(:class:`~trioserve.push.hub.Subscriber`, :class:`~trioserve.push.handler.Client`).
"""
