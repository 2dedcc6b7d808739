"""``python -m examples.chat``: run the chat server (see examples/chat/README.md)."""

from .server import main

main()
