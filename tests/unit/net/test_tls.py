"""server_context: the server's SSLContext from certfile and keyfile.

tests/security/test_tls.py covers TLS end to end and the usual certificate
mistakes (no key, the wrong key, both in one file); these are the context's
own settings and the remaining ways loading can fail.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import attrs
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from trioserve.config import Config, ConfigError
from trioserve.net.tls import server_context


@attrs.frozen
class Files:
    certfile: Path
    keyfile: Path
    key_pem: bytes


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    cert = trustme.CA().issue_cert("localhost")
    where = tmp_path_factory.mktemp("tls")
    certfile, keyfile = where / "cert.pem", where / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    return Files(certfile, keyfile, cert.private_key_pem.bytes())


def config(certfile: Path | str, keyfile: Path | str | None = None) -> Config:
    return Config(certfile=str(certfile), keyfile=None if keyfile is None else str(keyfile))


def test_a_server_context_with_tls_1_2_at_least_and_no_client_certificates(files: Files) -> None:
    ctx = server_context(config(files.certfile, files.keyfile))
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode is ssl.CERT_NONE
    assert not ctx.check_hostname


def test_without_a_certfile_there_is_no_context() -> None:
    with pytest.raises(ConfigError, match=r"^TLS needs certfile$"):
        server_context(Config())


def test_a_missing_certfile_is_named(files: Files, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=rf"^TLS: '{missing}' not found \(certfile / keyfile\)$"):
        server_context(config(missing, files.keyfile))


# load_cert_chain's FileNotFoundError carries no filename: the operator must
# still be sent to the file that is missing.
def test_a_missing_keyfile_is_named(files: Files, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=rf"^TLS: '{missing}' not found"):
        server_context(config(files.certfile, missing))


def test_an_encrypted_key_fails_instead_of_asking_for_a_passphrase(files: Files, tmp_path: Path) -> None:
    # Without the passphrase callback OpenSSL would prompt on the terminal and the
    # server would hang at start-up.
    key = serialization.load_pem_private_key(files.key_pem, password=None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"passphrase")))
    with pytest.raises(ConfigError, match=r"unencrypted private key"):
        server_context(config(files.certfile, encrypted))


def test_a_file_that_is_not_pem_names_both_files(files: Files, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as info:
        server_context(config(junk, files.keyfile))
    message = str(info.value)
    assert message.startswith(f"TLS: certfile '{junk}' and keyfile '{files.keyfile}' do not hold")
    assert "\n" not in message


def test_an_unreadable_certfile_is_a_config_error(tmp_path: Path) -> None:
    # A directory where the certificate should be: an OSError that is not "not found".
    with pytest.raises(ConfigError, match=r"^TLS: "):
        server_context(config(tmp_path))
