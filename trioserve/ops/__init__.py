"""5. The operator surface: the ``trioserve`` command, the supervisor of
``--workers N`` and its workers, and ``trioserve doctor``."""
