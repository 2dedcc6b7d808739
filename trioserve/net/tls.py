"""TLS for the listeners: the server's ``ssl.SSLContext`` from ``certfile`` / ``keyfile``.

With TLS configured, both ports speak it (``wss://`` and ``https://`` on the
HTTP port, TLS on the NDJSON port); accepted sockets go through
:class:`~trioserve.net.transport.TlsTransport`. Plain-text listeners keep the
zero-copy :class:`~trioserve.net.transport.SocketTransport`.
"""

from __future__ import annotations

import os
import ssl

from ..config import Config, ConfigError

__all__ = ["server_context"]


def server_context(config: Config) -> ssl.SSLContext:
    """A server-side SSLContext with ``config.certfile`` / ``keyfile`` loaded.

    Python's defaults for servers (``create_default_context(Purpose.CLIENT_AUTH)``:
    no SSLv3 or compression, strong ciphers), with TLS 1.2 as the oldest version.
    Client certificates are not asked for. Raises :class:`ConfigError` when the
    files cannot be read or do not hold a certificate and its matching key.
    """
    certfile = config.certfile
    if certfile is None:
        raise ConfigError("TLS needs certfile")
    keyfile = config.keyfile
    # Checked first: load_cert_chain's FileNotFoundError does not say which file.
    for path in (certfile, keyfile):
        if path is not None and not os.path.exists(path):
            raise ConfigError(f"TLS: {path!r} not found (certfile / keyfile)")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # A passphrase callback, or OpenSSL would prompt on the terminal for an
        # encrypted key; an empty passphrase makes such a key fail to load instead.
        ctx.load_cert_chain(certfile, keyfile, password=lambda: b"")
    except FileNotFoundError as exc:
        raise ConfigError(f"TLS: {exc.filename or certfile!r} not found "
                          "(certfile / keyfile)") from None
    except ssl.SSLError as exc:
        what = f"certfile {certfile!r}" + (f" and keyfile {keyfile!r}" if keyfile else "")
        raise ConfigError(f"TLS: {what} do not hold a PEM certificate chain and its unencrypted "
                          f"private key ({exc.reason or exc})") from None
    except OSError as exc:
        raise ConfigError(f"TLS: cannot read {exc.filename or certfile!r}: {exc.strerror}") from None
    return ctx
