"""1. The sans-I/O protocol layer: bytes in, events and bytes out; the token claims.

Nothing here imports trio or anything else of trioserve."""
