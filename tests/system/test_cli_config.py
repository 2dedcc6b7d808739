"""The CLI with config files: one-line errors, genconfig, token, and a real `serve --config`."""

from __future__ import annotations

import functools
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import jwt
import pytest
import trio
from click.testing import CliRunner, Result
from trio_websocket import open_websocket_url

from trioserve.config import Config, load_config
from trioserve.ops import cli

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
SECRET = "cli-test-secret-0123456789-0123456789-abcdef"
# Starting Python and importing trio takes a moment on a loaded CI machine.
STARTUP_TIMEOUT = 15.0
_LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+) ")


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    # The developer's own TRIOSERVE_* settings must not leak into the tests.
    for var in list(os.environ):
        if var.startswith("TRIOSERVE_"):
            monkeypatch.delenv(var)
    return CliRunner()


def invoke(runner: CliRunner, *args: str, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(cli.main, list(args), env=env, catch_exceptions=False)


def assert_one_line_error(result: Result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output


def write(tmp_path: Path, text: str, name: str = "trioserve.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "env", "pattern"), [
    ("prot = 8000\n", {}, r"trioserve.toml: unknown key 'prot'; did you mean 'port'\?"),
    ('port = "8000"\n', {}, r"port must be an integer, got the string '8000'"),
    ("", {"TRIOSERVE_CLIENT_PUBLISH": "maybe"}, r"TRIOSERVE_CLIENT_PUBLISH must be one of"),
    ('token_secret = "s"\ntoken_algorithms = ["none"]\n', {}, r"must not contain 'none'"),
    ('token_algorithms = ["HS256"]\n', {}, r"HS256, which needs token_secret"),
    ("port = \n", {}, r"invalid TOML"),
])
def test_serve_config_errors_are_one_line_exit_2(
    runner: CliRunner, tmp_path: Path, text: str, env: dict[str, str], pattern: str
) -> None:
    path = write(tmp_path, text)
    assert_one_line_error(invoke(runner, "serve", "--config", str(path), env=env), pattern)


def test_missing_config_file_from_the_environment(runner: CliRunner, tmp_path: Path) -> None:
    result = invoke(runner, "serve", env={"TRIOSERVE_CONFIG": str(tmp_path / "nope.toml")})
    assert_one_line_error(result, r"config file '.*nope.toml' not found")


def test_flags_override_only_when_given(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Config] = []

    class FakeServer:
        forced_exit = None

        def __init__(self, config: Config, **kwargs: Any):
            seen.append(config)

        async def serve(self) -> None:
            pass

    monkeypatch.setattr(cli, "Server", FakeServer)
    path = write(tmp_path, 'port = 1111\nhistory_size = 7\nping_interval = 3.0\nlog_level = "warning"\n'
                           'client_publish = true\n')
    result = invoke(runner, "serve", "--config", str(path), "--port", "2222",
                    env={"TRIOSERVE_HISTORY_SIZE": "9"})
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert (config.port, config.history_size) == (2222, 9)
    # Flags left at their defaults do not mask the file.
    assert (config.ping_interval, config.log_level, config.client_publish) == (3.0, "warning", True)


def test_help_shows_defaults_and_environment_variables(runner: CliRunner) -> None:
    result = invoke(runner, "serve", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for expected in ("TRIOSERVE_CONFIG", "TRIOSERVE_HISTORY_SIZE", "default: 100", "TRIOSERVE_LOG_FORMAT",
                     "default: text", "TRIOSERVE_ALLOWED_ORIGINS", "--no-anonymous", "default: 127.0.0.1"):
        assert expected in text, expected


# --- genconfig -------------------------------------------------------------------------------


def test_genconfig_to_stdout_loads_back(runner: CliRunner, tmp_path: Path) -> None:
    result = invoke(runner, "genconfig")
    assert result.exit_code == 0, result.output
    config = load_config(write(tmp_path, result.stdout), {})
    assert config.token_secret and config.api_key and config.token_secret != config.api_key
    assert len(config.token_secret) >= 43  # token_urlsafe(32)
    assert config == attrs.evolve(Config(), token_secret=config.token_secret, api_key=config.api_key)
    again = load_config(write(tmp_path, invoke(runner, "genconfig").stdout), {})
    assert again.token_secret != config.token_secret, "each run must make new secrets"


def test_genconfig_file_is_private_and_not_overwritten(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "trioserve.toml"
    assert invoke(runner, "genconfig", str(path)).exit_code == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_text()
    assert_one_line_error(invoke(runner, "genconfig", str(path)), r"exists; pass --force to overwrite it")
    assert path.read_text() == first
    path.chmod(0o644)
    assert invoke(runner, "genconfig", str(path), "--force").exit_code == 0
    assert path.read_text() != first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --- token -----------------------------------------------------------------------------------


def decode(token: str, key: str = SECRET, **kwargs: Any) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=["HS256", "HS384", "HS512"], **kwargs)
    return claims


def test_token_claims(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, f'token_secret = "{SECRET}"\n')
    before = int(time.time())
    result = invoke(runner, "token", "--config", str(path), "--sub", "alice", "--subscribe", "chat.*",
                    "--subscribe", "news", "--publish", "chat.lobby", "--presence", "--ttl", "1h")
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = decode(token)
    assert claims["sub"] == "alice"
    assert claims["subscribe"] == ["chat.*", "news"] and claims["publish"] == ["chat.lobby"]
    assert claims["presence"] is True
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] - claims["iat"] == 3600
    assert "aud" not in claims and "iss" not in claims


@pytest.mark.parametrize(("ttl", "seconds"), [("90s", 90), ("15m", 900), ("2d", 172800), ("120", 120)])
def test_token_minimal_claims_and_ttl_forms(runner: CliRunner, ttl: str, seconds: int) -> None:
    result = invoke(runner, "token", "--sub", "bob", "--ttl", ttl, env={"TRIOSERVE_TOKEN_SECRET": SECRET})
    assert result.exit_code == 0, result.output
    claims = decode(result.stdout.strip())
    assert set(claims) == {"sub", "iat", "exp"}
    assert claims["exp"] - claims["iat"] == seconds


def test_token_audience_issuer_and_configured_algorithm(runner: CliRunner, tmp_path: Path) -> None:
    secret = SECRET * 2  # HS384 wants 48 bytes
    path = write(tmp_path, f'token_secret = "{secret}"\ntoken_algorithms = ["HS384", "HS256"]\n'
                           'token_audience = "push"\ntoken_issuer = "https://auth.example"\n')
    result = invoke(runner, "token", "--config", str(path), "--sub", "carol")
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == "HS384"
    assert result.stderr == ""
    claims = decode(token, secret, audience="push", issuer="https://auth.example")
    assert claims["exp"] - claims["iat"] == 3600  # the default ttl


def test_token_errors(runner: CliRunner, tmp_path: Path) -> None:
    assert_one_line_error(invoke(runner, "token", "--sub", "a"), r"no token_secret to sign with")
    pem = write(tmp_path, "-----BEGIN PUBLIC KEY-----\n", "key.pem")
    result = invoke(runner, "token", "--sub", "a", env={"TRIOSERVE_TOKEN_PUBLIC_KEY_FILE": str(pem)})
    assert_one_line_error(result, r"token_public_key is not a PEM public key")
    env = {"TRIOSERVE_TOKEN_SECRET": SECRET}
    assert_one_line_error(invoke(runner, "token", "--sub", "a", "--subscribe", "bad topic", env=env),
                          r"--subscribe 'bad topic' is not a topic pattern")
    result = invoke(runner, "token", "--sub", "a", "--ttl", "soon", env=env)
    assert result.exit_code == 2 and "'soon' is not a duration" in result.stderr
    assert "Traceback" not in result.output


def test_token_refuses_to_sign_with_only_a_public_key(runner: CliRunner, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    public = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pub.pem").write_bytes(public)
    path = write(tmp_path, 'token_public_key_file = "pub.pem"\n')
    assert_one_line_error(invoke(runner, "token", "--config", str(path), "--sub", "a"),
                          r"only token_public_key, which can verify tokens but not sign them")


@pytest.mark.filterwarnings("ignore::jwt.InsecureKeyLengthWarning")
def test_short_secret_warns_in_one_line(runner: CliRunner) -> None:
    result = invoke(runner, "token", "--sub", "a", env={"TRIOSERVE_TOKEN_SECRET": "short"})
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [
        "warning: token_secret is 5 bytes; HS256 wants at least 32 (trioserve genconfig makes one)"]
    assert decode(result.stdout.strip(), key="short")["sub"] == "a"


# --- a real server process -------------------------------------------------------------------


@attrs.define
class Log:
    data: bytearray = attrs.Factory(bytearray)
    eof: bool = False
    changed: trio.Event = attrs.Factory(trio.Event)

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        self.eof = not chunk
        self.changed.set()
        self.changed = trio.Event()

    def lines(self) -> Iterator[str]:
        return iter(self.data.decode(errors="replace").splitlines())

    async def wait_for(self, pattern: re.Pattern[str]) -> re.Match[str]:
        while (match := pattern.search(self.data.decode(errors="replace"))) is None:
            assert not self.eof, f"{pattern.pattern!r} not in the server's log:\n{self.data.decode()}"
            await self.changed.wait()
        return match


async def test_serve_with_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'port = 0\nclient_publish = true\nlog_format = "json"\nhistory_size = 3\n')
    cmd = [sys.executable, "-m", "trioserve", "serve", "--config", str(path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOSERVE_")}
    log = Log()
    with trio.fail_after(STARTUP_TIMEOUT + 20):
        async with trio.open_nursery() as nursery:
            proc: trio.Process = await nursery.start(functools.partial(
                trio.run_process, cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False,
            ))

            async def pump() -> None:
                assert proc.stderr is not None
                while chunk := await proc.stderr.receive_some(65536):
                    log.feed(bytes(chunk))
                log.feed(b"")

            nursery.start_soon(pump)
            try:
                with trio.fail_after(STARTUP_TIMEOUT):
                    port = int((await log.wait_for(_LISTENING)).group(1))
                async with open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
                    await ws.send_message(json.dumps({"op": "subscribe", "topic": "news", "id": 1}))
                    assert json.loads(await ws.get_message())["ok"] is True
                    # Clients may publish only because the file says client_publish = true.
                    await ws.send_message(json.dumps({"op": "publish", "topic": "news", "data": 7, "id": 2}))
                    replies = [json.loads(await ws.get_message()) for _ in range(2)]
                assert any(r.get("id") == 2 and r["ok"] is True for r in replies), replies
                assert any(r.get("op") == "pub" and r["data"] == 7 for r in replies), replies
            finally:
                proc.terminate()
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
    assert proc.returncode == 0, log.data.decode()
    entries = [json.loads(line) for line in log.lines()]
    assert entries and all({"ts", "level", "logger", "msg"} <= set(e) for e in entries), entries
    assert any(e["msg"].startswith("drained ") for e in entries), entries
