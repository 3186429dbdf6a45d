"""Settings: flags win over environment, environment over defaults, bad values exit 2."""

from __future__ import annotations

import pytest

from proxy import config
from proxy.config import DEFAULT_BUCKETS, OPTIONS, Address, Settings


def test_defaults() -> None:
    """With no flags and no environment the documented defaults apply."""
    settings = config.load([], {})
    assert settings == Settings()
    assert settings.listen == Address("127.0.0.1", 3128)
    assert settings.admin_listen == Address("127.0.0.1", 9901)
    assert settings.histogram_buckets[0] == 0.0005
    assert settings.histogram_buckets[-1] == 30.0
    assert len(DEFAULT_BUCKETS) == 15


def test_environment_twin_and_flag_precedence() -> None:
    """A PROXY_* variable sets a value; the flag overrides it."""
    env = {"PROXY_CONNECT_TIMEOUT": "2.5", "PROXY_LISTEN": "0.0.0.0:8080"}
    settings = config.load(["--listen", "[::1]:3129"], env)
    assert settings.connect_timeout == 2.5
    assert settings.listen == Address("::1", 3129)


def test_every_setting_has_a_flag_and_an_env_twin() -> None:
    """Each Settings field is reachable as --flag and PROXY_FIELD."""
    fields = set(Settings.__dataclass_fields__)
    assert {option.field for option in OPTIONS} == fields
    for option in OPTIONS:
        assert option.env == "PROXY_" + option.field.upper()


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--connect-timeout", "abc"], {}, "--connect-timeout (PROXY_CONNECT_TIMEOUT)"),
        ([], {"PROXY_LISTEN": "nowhere"}, "--listen (PROXY_LISTEN)"),
        (["--histogram-buckets", "1,0.5"], {}, "--histogram-buckets"),
        (["--log-format", "xml"], {}, "--log-format (PROXY_LOG_FORMAT)"),
        (["--pool-limit", "-1"], {}, "--pool-limit (PROXY_POOL_LIMIT)"),
        (["--dns-servers", "example.com"], {}, "--dns-servers"),
        (["--request-id-header", "bad header"], {}, "--request-id-header"),
        (["--no-such-flag"], {}, "--no-such-flag"),
    ],
)
def test_bad_values_exit_2_with_one_line_naming_the_setting(
    argv: list[str], env: dict[str, str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value, from a flag or the environment, exits 2 with one line that names it."""
    with pytest.raises(SystemExit) as exit_info:
        config.load(argv, env)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert named in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:0", Address("127.0.0.1", 0)),
        (":3128", Address("0.0.0.0", 3128)),
        ("[::]:9901", Address("::", 9901)),
        ("localhost:80", Address("localhost", 80)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    """Listener addresses accept HOST:PORT, :PORT and [IPv6]:PORT."""
    assert config.parse_address(text) == expected


def test_admin_listener_can_be_turned_off() -> None:
    """--admin-listen off disables the admin listener."""
    assert config.load(["--admin-listen", "off"], {}).admin_listen is None


def test_help_lists_every_flag_with_its_env_twin_and_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--help shows each flag, its environment variable and its default."""
    with pytest.raises(SystemExit):
        config.load(["--help"], {})
    text = " ".join(capsys.readouterr().out.split())
    for option in OPTIONS:
        assert option.flag in text
        assert option.env in text
    assert "(default: 127.0.0.1:3128)" in text
