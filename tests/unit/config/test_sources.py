"""Loading a Config: file < environment < overrides, each source's own parsing, and
one-line errors that name the source; and genconfig's file."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest

from trioserve.config import Config, HistoryRule, SlowConsumerPolicy, load_config
from trioserve.config.sources import OPTIONS, Kind, render_config

from .helpers import SECRET, config_error

REPO = Path(__file__).resolve().parents[3]


def write(tmp_path: Path, text: str, name: str = "trioserve.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and precedence -----------------------------------------------------------------


def test_no_sources_give_the_defaults() -> None:
    assert load_config(None, {}) == Config()
    defaults = Config()
    assert (defaults.host, defaults.port, defaults.history_size, defaults.history_ttl) == (
        "127.0.0.1", 8000, 100, 300.0)
    assert defaults.allowed_origins == () and defaults.presence_events == ()
    assert (defaults.log_level, defaults.log_format, defaults.refresh_grace) == ("info", "text", 30.0)


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, 'port = 1111\nhistory_size = 5\nlog_level = "debug"\nhost = "0.0.0.0"\n')
    env = {"TRIOSERVE_PORT": "2222", "TRIOSERVE_HISTORY_SIZE": "6"}
    cfg = load_config(path, env, {"port": 3333})
    assert cfg.port == 3333  # override beats env beats file
    assert cfg.history_size == 6  # env beats file
    assert (cfg.log_level, cfg.host) == ("debug", "0.0.0.0")  # file beats defaults
    assert load_config(path, env).port == 2222
    assert load_config(path, {}).port == 1111


def test_config_file_named_by_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 1234\n")
    other = write(tmp_path, "port = 4321\n", "other.toml")
    assert load_config(None, {"TRIOSERVE_CONFIG": str(path)}).port == 1234
    assert load_config(other, {"TRIOSERVE_CONFIG": str(path)}).port == 4321


def test_environment_can_unset_an_optional_value(tmp_path: Path) -> None:
    path = write(tmp_path, f'tcp_port = 9000\ntoken_secret = "{SECRET}"\n')
    cfg = load_config(path, {"TRIOSERVE_TCP_PORT": "", "TRIOSERVE_TOKEN_SECRET": ""})
    assert cfg.tcp_port is None and cfg.token_secret is None


# --- unknown keys and wrong types ------------------------------------------------------------


def test_unknown_key_names_it_and_suggests_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path, "prot = 9000\n")
    message = config_error(r"unknown key 'prot'; did you mean 'port'\?", path=path)
    assert message.startswith(str(path))
    config_error(r"unknown key 'history_szie'; did you mean 'history_size'\?",
                 path=write(tmp_path, "history_szie = 1\n"))
    config_error(r"unknown key 'zzz'; see docs/configuration.md", path=write(tmp_path, "zzz = 1\n"))


def test_tables_are_not_sections(tmp_path: Path) -> None:
    config_error(r"unknown table \[server\]; options are top-level keys",
                 path=write(tmp_path, "[server]\nport = 1\n"))


def test_unknown_override_is_an_error() -> None:
    config_error(r"unknown option 'hots'; did you mean 'host'\?", overrides={"hots": "x"})


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('port = "8000"', r"port must be an integer, got the string '8000'"),
        ("port = 80.5", r"port must be an integer, got the number 80.5"),
        ("port = true", r"port must be an integer, got true"),
        ('client_publish = "yes"', r"client_publish must be true or false, got the string 'yes'"),
        ('ping_interval = "25"', r"ping_interval must be a number, got the string '25'"),
        ("host = 1", r"host must be a string, got the integer 1"),
        ('allowed_origins = "https://a.example"', r"allowed_origins must be an array of strings, got the"),
        ("presence_events = [1]", r"presence_events must be an array of strings, got an array"),
        ("history_rules = 3", r"history_rules must be \[\[history_rules\]\] tables"),
        ("port = 70000", r"port must be a port number 0-65535, got 70000"),
        ("history_size = -1", r"history_size must be an integer >= 0"),
        ('log_level = "loud"', r"log_level must be one of debug, info, warning, error"),
        ('log_format = "xml"', r"log_format must be one of text, json"),
        ('slow_consumer_policy = "ignore"', r"slow_consumer_policy must be one of disconnect, drop-oldest"),
        ('host = ""', r"host is empty"),
    ],
)
def test_wrong_values_name_the_key_and_what_was_expected(tmp_path: Path, line: str, match: str) -> None:
    config_error(match, path=write(tmp_path, line + "\n"))


def test_unreadable_or_invalid_files(tmp_path: Path) -> None:
    config_error(r"config file '.*missing.toml' not found", path=tmp_path / "missing.toml")
    config_error(r"invalid TOML: .*line 1", path=write(tmp_path, "port = \n"))
    (tmp_path / "latin1.toml").write_bytes(b'host = "\xe9"\n')
    config_error(r"not UTF-8 text", path=tmp_path / "latin1.toml")


# --- environment parsing ---------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "value"), [
    ("1", True), ("true", True), ("YES", True), ("yes", True),
    ("0", False), ("false", False), ("No", False), ("no", False),
])
def test_environment_booleans(raw: str, value: bool) -> None:
    assert load_config(None, {"TRIOSERVE_CLIENT_PUBLISH": raw}).client_publish is value


def test_environment_tuples_numbers_and_optional_bools() -> None:
    env = {
        "TRIOSERVE_ALLOWED_ORIGINS": " https://a.example, https://b.example:8443 ,",
        "TRIOSERVE_PRESENCE_EVENTS": "room.*,chat.*",
        "TRIOSERVE_HISTORY_TTL": "12.5",
        "TRIOSERVE_MAX_CONNECTIONS": "50",
        "TRIOSERVE_TOKEN_SECRET": SECRET,
        "TRIOSERVE_TOKEN_ALGORITHMS": "HS256,HS512",
        "TRIOSERVE_ANONYMOUS": "yes",
        "TRIOSERVE_SLOW_CONSUMER_POLICY": "drop-oldest",
    }
    cfg = load_config(None, env)
    assert cfg.allowed_origins == ("https://a.example", "https://b.example:8443")
    assert cfg.presence_events == ("room.*", "chat.*")
    assert (cfg.history_ttl, cfg.max_connections) == (12.5, 50)
    assert cfg.token_algorithms == ("HS256", "HS512") and cfg.anonymous is True
    assert cfg.slow_consumer_policy is SlowConsumerPolicy.DROP_OLDEST
    assert load_config(None, {"TRIOSERVE_ANONYMOUS": ""}).anonymous is None
    assert load_config(None, {"TRIOSERVE_ALLOWED_ORIGINS": ""}).allowed_origins == ()


@pytest.mark.parametrize(("var", "raw", "match"), [
    ("TRIOSERVE_CLIENT_PUBLISH", "maybe", r"TRIOSERVE_CLIENT_PUBLISH must be one of 1/0/true/false/yes/no"),
    ("TRIOSERVE_PORT", "80x", r"TRIOSERVE_PORT must be an integer, got '80x'"),
    ("TRIOSERVE_PING_INTERVAL", "soon", r"TRIOSERVE_PING_INTERVAL must be a number"),
    ("TRIOSERVE_PING_INTERVAL", "nan", r"TRIOSERVE_PING_INTERVAL must be a number"),
    ("TRIOSERVE_PROT", "1", r"TRIOSERVE_PROT is not a trioserve setting; did you mean TRIOSERVE_PORT\?"),
    ("TRIOSERVE_port", "1", r"did you mean TRIOSERVE_PORT\?"),
    ("TRIOSERVE_HISTORY_RULES", "x", r"history_rules can only be set in a config file"),
])
def test_environment_errors(var: str, raw: str, match: str) -> None:
    config_error(match, env={var: raw})


def test_unrelated_prefixed_variables_are_ignored() -> None:
    # A client tool may use the prefix for its own settings.
    assert load_config(None, {"TRIOSERVE_URL": "ws://x", "TRIOSERVE_TOKEN": "t"}) == Config()


# --- the token's public key file -------------------------------------------------------------


def test_public_key_file_is_relative_to_the_config_file(tmp_path: Path, rsa_pem: str) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "pub.pem").write_text(rsa_pem)
    path = write(tmp_path, 'token_public_key_file = "keys/pub.pem"\n')
    cfg = load_config(path, {})
    assert cfg.token_public_key == rsa_pem and cfg.auth_enabled and not cfg.anonymous_allowed
    config_error(r"token_public_key_file: cannot read '.*nope.pem': No such file",
                 path=write(tmp_path, 'token_public_key_file = "nope.pem"\n'))
    config_error(r"set token_public_key or token_public_key_file, not both",
                 path=write(tmp_path, 'token_public_key_file = "k.pem"\ntoken_public_key = "x"\n'))


def test_a_later_source_replaces_the_key_or_key_file(tmp_path: Path, rsa_pem: str, ec_pem: str) -> None:
    (tmp_path / "ec.pem").write_text(ec_pem)
    path = write(tmp_path, 'token_public_key_file = "ec.pem"\n')
    assert load_config(path, {"TRIOSERVE_TOKEN_PUBLIC_KEY": rsa_pem}).token_public_key == rsa_pem
    file_with_key = write(tmp_path, f'token_public_key = """{rsa_pem}"""\n', "k.toml")
    env = {"TRIOSERVE_TOKEN_PUBLIC_KEY_FILE": str(tmp_path / "ec.pem")}
    assert load_config(file_with_key, env).token_public_key == ec_pem


# --- history and presence --------------------------------------------------------------------


def test_history_rules_from_toml_first_match_wins(tmp_path: Path) -> None:
    path = write(tmp_path, """
history_size = 50
history_ttl = 60

[[history_rules]]
pattern = "chat.vip.*"
size = 1000
ttl = 86400

[[history_rules]]
pattern = "chat.*"
size = 500
ttl = 3600.5

[[history_rules]]
pattern = "ticks"
size = 0
ttl = 1
""")
    cfg = load_config(path, {})
    assert cfg.history_rules == (HistoryRule("chat.vip.*", 1000, 86400.0), HistoryRule("chat.*", 500, 3600.5),
                                 HistoryRule("ticks", 0, 1.0))
    assert cfg.history_for("chat.vip.lounge") == (1000, 86400.0)
    assert cfg.history_for("chat.lobby") == (500, 3600.5)
    assert cfg.history_for("ticks") == (0, 1.0)
    assert cfg.history_for("news") == (50, 60.0)
    assert cfg.history_for("Chat.lobby") == (50, 60.0)  # case-sensitive, like topics


@pytest.mark.parametrize(("table", "match"), [
    ('pattern = "a"\nsize = 1', r"history_rules\[0\] has no 'ttl'; each rule needs pattern, size and ttl"),
    ('pattern = "a"\nsize = 1\nttl = 1\nsise = 2', r"history_rules\[0\]: unknown key 'sise'; did you mean"),
    ('pattern = "a"\nsize = "1"\nttl = 1', r"history_rules\[0\].size must be an integer, got the string '1'"),
    ('pattern = "a"\nsize = 1\nttl = 0', r"history_rules\[0\]: history rule 'a': ttl must be a number"),
    ('pattern = "a b"\nsize = 1\nttl = 1', r"history_rules\[0\]: history rule pattern 'a b' is not a topic"),
])
def test_bad_history_rules(tmp_path: Path, table: str, match: str) -> None:
    config_error(match, path=write(tmp_path, f"[[history_rules]]\n{table}\n"))


# --- genconfig -------------------------------------------------------------------------------


def test_genconfig_round_trip(tmp_path: Path) -> None:
    text = render_config(token_secret="generated-secret-0123456789-abcdefghij", api_key="generated-key-0123")
    cfg = load_config(write(tmp_path, text), {})
    expected = attrs.evolve(Config(), token_secret="generated-secret-0123456789-abcdefghij",
                            api_key="generated-key-0123")
    assert cfg == expected


def test_genconfig_shows_every_option(tmp_path: Path) -> None:
    text = render_config(token_secret="s" * 43, api_key="k" * 43)
    for name, opt in OPTIONS.items():
        shown = f"[[{name}]]" if opt.kind is Kind.RULES else f"{name} = "
        assert re.search(rf"^(# )?{re.escape(shown)}", text, re.MULTILINE), name
    # Each commented-out example is itself a valid setting once uncommented.
    for name in ("tcp_port", "max_connections", "anonymous"):
        line = next(line for line in text.splitlines() if line.startswith(f"# {name} = "))
        extra = {"anonymous": f'token_secret = "{SECRET}"\n'}.get(name, "")
        assert load_config(write(tmp_path, extra + line[2:] + "\n"), {}) is not None


def test_every_option_is_documented() -> None:
    docs = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    for name, opt in OPTIONS.items():
        assert opt.help, f"{name} has no help line in trioserve/config/sources.py"
        assert f"`{name}`" in docs, f"{name} is missing from docs/configuration.md"
        if opt.kind is not Kind.RULES:
            assert f"`{opt.env}`" in docs, f"{opt.env} is missing from docs/configuration.md"
