"""Settings: flags win over environment, environment over defaults, bad values exit 2."""

from __future__ import annotations

from pathlib import Path

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
        (["--otlp-endpoint", "ftp://collector"], {}, "--otlp-endpoint (PROXY_OTLP_ENDPOINT)"),
        ([], {"PROXY_OTLP_SAMPLE_RATIO": "1.5"}, "--otlp-sample-ratio"),
        (["--otlp-sample-ratio", "nan"], {}, "--otlp-sample-ratio"),
        (["--otlp-batch-size", "0"], {}, "--otlp-batch-size"),
        ([], {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ([], {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "x"}, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        ([], {"OTEL_SERVICE_NAME": " "}, "OTEL_SERVICE_NAME"),
        (["--upgrade-to-https", "a b"], {}, "--upgrade-to-https (PROXY_UPGRADE_TO_HTTPS)"),
        ([], {"PROXY_UPSTREAM_CA_FILE": "/nonexistent/ca.pem"}, "--upstream-ca-file"),
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


_TRACES = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
_BASE = "OTEL_EXPORTER_OTLP_ENDPOINT"


@pytest.mark.parametrize(
    ("argv", "env", "endpoint"),
    [
        ([], {}, None),
        (["--otlp-endpoint", "http://127.0.0.1:4318"], {}, "http://127.0.0.1:4318/v1/traces"),
        (["--otlp-endpoint", "http://c:4318/"], {}, "http://c:4318/v1/traces"),
        (["--otlp-endpoint", "https://c/otlp/v1/traces"], {}, "https://c/otlp/v1/traces"),
        (["--otlp-endpoint", "http://[::1]:4318"], {}, "http://[::1]:4318/v1/traces"),
        (["--otlp-endpoint", "off"], {_TRACES: "http://t:1/x"}, None),
        ([], {"PROXY_OTLP_ENDPOINT": "http://p:1"}, "http://p:1/v1/traces"),
        (
            [],
            {"PROXY_OTLP_ENDPOINT": "http://p:1", _TRACES: "http://t:1/x"},
            "http://p:1/v1/traces",
        ),
        ([], {_TRACES: "http://t:1/x", _BASE: "http://b:1"}, "http://t:1/x"),
        ([], {_TRACES: "http://t:1"}, "http://t:1"),  # the traces variable is used as it is
        ([], {_BASE: "http://b:1"}, "http://b:1/v1/traces"),
        ([], {_BASE: "http://b:1/otel/"}, "http://b:1/otel/v1/traces"),
        ([], {_BASE: ""}, None),
    ],
)
def test_otlp_endpoint_sources_and_precedence(
    argv: list[str], env: dict[str, str], endpoint: str | None
) -> None:
    """Flag, then PROXY_OTLP_ENDPOINT, then the standard traces variable, then the base one."""
    assert config.load(argv, env).otlp_endpoint == endpoint


def test_service_name_from_otel_service_name_unless_set() -> None:
    """OTEL_SERVICE_NAME names the service unless the flag or its twin does."""
    assert config.load([], {"OTEL_SERVICE_NAME": "svc"}).otlp_service_name == "svc"
    env = {"OTEL_SERVICE_NAME": "svc", "PROXY_OTLP_SERVICE_NAME": "mine"}
    assert config.load([], env).otlp_service_name == "mine"


def test_upstream_ca_file_without_a_certificate_exits_2(tmp_path: Path) -> None:
    """A --upstream-ca-file that cannot be loaded is a bad setting, named in one line."""
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("hello\n")
    for path in (str(bad), str(tmp_path / "missing.pem")):
        with pytest.raises(SystemExit) as exit_info:
            config.load(["--upstream-ca-file", path], {})
        assert exit_info.value.code == 2
