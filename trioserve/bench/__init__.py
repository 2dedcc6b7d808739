"""``trioserve bench``: a multi-process load tester for trioserve servers (docs/bench.md).

- ``cli.py``: the ``bench`` click command, which ``trioserve.ops.cli`` adds to ``trioserve``;
- ``options.py``: the options, their checks and the plan; ``runner.py``: the orchestrator
  (phases, polling); ``publisher.py``: the publishers;
- ``worker.py``: a load-client process; ``pool.py``: starting and driving those processes;
- ``subscriber.py``: subscribers that keep their place in a topic across reconnects;
- ``wsclient.py``: the cheap hand-parsed WebSocket / NDJSON client connections;
- ``hist.py``: HDR latency histograms; ``scrape.py``: the server's ``/metrics``;
- ``report.py``, ``output.py``, ``progress.py``, ``plot.py``: the result and its display.

``benchmarks/fanout.py`` (the comparison benchmark) is built on ``pool``,
``wsclient`` and ``output`` too, and the fault-injection tests (tests/faults)
on ``pool``, ``subscriber`` and ``wsclient``. Nothing here is imported by the server.
"""
