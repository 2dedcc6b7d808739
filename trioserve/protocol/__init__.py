"""Sans-I/O protocol layer: bytes in, events and bytes out. Nothing here imports trio."""
