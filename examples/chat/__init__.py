"""The example chat: a trioserve server used as a library, a browser client and a terminal client.

``python -m examples.chat`` runs the server; ``python -m examples.chat.client``
the terminal client. See README.md in this folder.
"""
