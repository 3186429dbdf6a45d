"""The CA and the leaves it mints: strict verifiers accept them, without any socket."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.tls.certs import (
    CA_DAYS,
    CAError,
    CertificateAuthority,
    mint_leaf,
    subject_alt_name,
    write_ca,
)
from proxy.tls.contexts import ServerContexts
from tests.conftest import unavailable


def strict_client(ca: CertificateAuthority) -> ssl.SSLContext:
    """What Python 3.13 builds by default: the system's checks plus VERIFY_X509_STRICT."""
    context = ssl.create_default_context(cadata=ca.cert_pem().decode())
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def handshake(client: ssl.SSLContext, server: ssl.SSLContext, name: str | None) -> ssl.SSLObject:
    """A full TLS handshake over memory BIOs; returns the client's end."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    hostname = name
    if name is not None and name.startswith("["):
        hostname = name.strip("[]")
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for end in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        try:
            c.do_handshake()
            s.do_handshake()
        except ssl.SSLWantReadError:
            continue
        return c
    raise AssertionError("handshake did not finish")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def test_ca_has_what_strict_verifiers_demand(ca: CertificateAuthority) -> None:
    """CA:TRUE critical, keyUsage keyCertSign critical, a subject key identifier, P-256."""
    ext = ca.cert.extensions
    constraints = ext.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert isinstance(ca.key.curve, ec.SECP256R1)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.example.com", x509.DNSName("api.example.com")),
        ("API.Example.com.", x509.DNSName("api.example.com")),
        ("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
        ("::1", x509.IPAddress(ipaddress.ip_address("::1"))),
        ("[::1]", x509.IPAddress(ipaddress.ip_address("::1"))),
    ],
)
def test_subject_alt_name_is_dns_or_ip(host: str, expected: x509.GeneralName) -> None:
    """IP literals get an iPAddress entry (clients match IPs only there), names a dNSName."""
    assert subject_alt_name(host) == expected


@pytest.mark.parametrize("host", ["localhost", "api.example.com", "127.0.0.1", "[::1]"])
def test_minted_leaf_passes_a_strict_verifier(ca: CertificateAuthority, host: str) -> None:
    """A handshake against the minted leaf verifies with VERIFY_X509_STRICT and the right name."""
    end = handshake(strict_client(ca), ServerContexts(ca)(host), host)
    assert end.selected_alpn_protocol() is None  # the client offered none
    peer = end.getpeercert()
    assert peer is not None
    assert peer["subjectAltName"]


def test_leaf_has_key_identifiers_and_server_auth(ca: CertificateAuthority) -> None:
    """AKI names the CA's SKI; basicConstraints critical CA:FALSE; EKU serverAuth only."""
    leaf = mint_leaf(ca, "h.example", ec.generate_private_key(ec.SECP256R1()))
    ext = leaf.extensions
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.subject_key_identifier.digest
    constraints = ext.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.issuer == ca.cert.subject


def test_leaf_for_another_name_is_rejected(ca: CertificateAuthority) -> None:
    """The verifier still checks names: a leaf for a.example does not pass for b.example."""
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(strict_client(ca), ServerContexts(ca)("a.example"), "b.example")


def test_another_ca_is_not_trusted(ca: CertificateAuthority) -> None:
    """A client that trusts a different CA rejects the minted leaf."""
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(strict_client(CertificateAuthority.create()), ServerContexts(ca)("h"), "h")


@pytest.mark.parametrize(
    ("served", "offered", "selected"),
    [
        (("http/1.1",), ["h2", "http/1.1"], "http/1.1"),  # aiohttp's server: HTTP/1.1 only
        (("h2", "http/1.1"), ["http/1.1", "h2"], "h2"),  # the server's order wins
        (("http/1.1",), ["h2"], None),  # no overlap: OpenSSL agrees on nothing, silently
    ],
)
def test_server_offers_what_it_serves(
    ca: CertificateAuthority, served: tuple[str, ...], offered: list[str], selected: str | None
) -> None:
    """ALPN: the server context offers the protocols it was given, in its order."""
    client = strict_client(ca)
    client.set_alpn_protocols(offered)
    context = ServerContexts(ca, alpn=served)("h")
    assert handshake(client, context, "h").selected_alpn_protocol() == selected


def test_each_spelling_of_a_host_mints_its_own_leaf(ca: CertificateAuthority) -> None:
    """Spellings of one IP or name share one leaf: the cache is keyed by what the leaf names."""
    contexts = ServerContexts(ca)
    loopback = ["::1", "[::1]", "0::1", "0:0::1", "::0001", "0:0:0:0:0:0:0:1", "0000::0:1"]
    names = ["api.example", "API.example", "api.example.", "Api.Example."]
    for spelling in loopback:
        assert contexts(spelling) is contexts("::1")
    for spelling in names:
        assert contexts(spelling) is contexts("api.example")
    assert contexts.minted == 2
    client = strict_client(ca)
    handshake(client, contexts("0:0::1"), "[::1]")  # the leaf names IP ::1


def test_contexts_are_cached_and_bounded(ca: CertificateAuthority) -> None:
    """One context per host, reused; past the bound the least recently used is dropped."""
    contexts = ServerContexts(ca, max_hosts=2)
    a = contexts("a")
    assert contexts("a") is a
    contexts("b")
    contexts("a")  # a is now the most recent
    contexts("c")  # evicts b
    assert len(contexts) == 2
    assert contexts.minted == 3
    assert contexts("a") is a
    contexts("b")
    assert contexts.minted == 4


def test_ca_expired_while_running_mints_a_leaf_that_cannot_verify(
    ca: CertificateAuthority,
) -> None:
    """Past the CA's notAfter, minting raises CAError naming the expiry, not a bare ValueError."""
    later = ca.cert.not_valid_after_utc + datetime.timedelta(seconds=1)
    contexts = ServerContexts(ca, clock=lambda: later)
    with pytest.raises(CAError, match="expired on"):
        contexts("api.example")
    assert contexts.minted == 0


def test_leaf_is_reminted_near_its_expiry(ca: CertificateAuthority) -> None:
    """A cached leaf with less than a day left is replaced by a fresh one."""
    now = [datetime.datetime.now(datetime.UTC)]
    contexts = ServerContexts(ca, clock=lambda: now[0])
    first = contexts("h")
    now[0] += datetime.timedelta(days=29, hours=1)
    assert contexts("h") is not first


def test_write_ca_files_and_modes(tmp_path: Path, ca: CertificateAuthority) -> None:
    """ca.pem and ca-key.pem are written, the key 0600, and load back as the same CA."""
    cert_path, key_path = write_ca(str(tmp_path / "ca"), ca)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    loaded = CertificateAuthority.load(str(cert_path), str(key_path))
    assert loaded.cert == ca.cert
    assert loaded.key.private_numbers() == ca.key.private_numbers()


def test_write_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    """A second run on the same directory raises and leaves the files as they were."""
    _cert_path, key_path = write_ca(str(tmp_path))
    before = key_path.read_bytes()
    with pytest.raises(FileExistsError):
        write_ca(str(tmp_path))
    assert key_path.read_bytes() == before


def _dated_ca(days_ago: int) -> CertificateAuthority:
    """A CA created ``days_ago`` days ago (negative: in the future)."""
    return CertificateAuthority.create(
        now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days_ago)
    )


def _ca_files(tmp_path: Path) -> tuple[Path, Path]:
    return write_ca(str(tmp_path / "ca"))


@pytest.mark.parametrize(
    ("fault", "setting", "message"),
    [
        ("key_group_readable", "ca_key", "readable by group"),
        ("key_world_readable", "ca_key", "readable by others"),
        ("key_missing", "ca_key", "cannot read"),
        ("cert_missing", "ca_cert", "cannot read"),
        ("cert_garbage", "ca_cert", "no PEM certificate"),
        ("key_garbage", "ca_key", "no unencrypted PEM private key"),
        ("key_of_another_ca", "ca_key", "does not belong"),
        ("cert_is_a_leaf", "ca_cert", "not a CA"),
        ("cert_expired", "ca_cert", "expired on"),
        ("cert_not_yet_valid", "ca_cert", "not valid before"),
    ],
)
def test_bad_ca_names_the_setting_and_hides_the_key(
    tmp_path: Path, fault: str, setting: str, message: str
) -> None:
    """Each fault raises CAError for the right setting; no key bytes in the message."""
    cert_path, key_path = _ca_files(tmp_path)
    secret = key_path.read_bytes()
    if fault == "key_group_readable":
        if os.geteuid() != 0:
            unavailable("needs root to give the key another group")
        key_path.chmod(0o640)
        os.chown(key_path, -1, os.getegid() + 1)
    elif fault == "key_world_readable":
        key_path.chmod(0o604)
    elif fault == "key_missing":
        key_path.unlink()
    elif fault == "cert_missing":
        cert_path.unlink()
    elif fault == "cert_garbage":
        cert_path.write_bytes(b"not a certificate")
    elif fault == "key_garbage":
        key_path.write_bytes(secret[:60] + b"garbage" + secret[60:])
    elif fault == "key_of_another_ca":
        key_path.write_bytes(CertificateAuthority.create().key_pem())
    elif fault == "cert_is_a_leaf":
        ca = CertificateAuthority.load(str(cert_path), str(key_path))
        leaf = mint_leaf(ca, "h", ca.key)
        cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    elif fault in ("cert_expired", "cert_not_yet_valid"):
        days = CA_DAYS + 1 if fault == "cert_expired" else -1
        cert_path, key_path = write_ca(str(tmp_path / "dated"), _dated_ca(days_ago=days))
        secret = key_path.read_bytes()
    with pytest.raises(CAError) as info:
        CertificateAuthority.load(str(cert_path), str(key_path))
    assert info.value.setting == setting
    assert message in str(info.value)
    body = b"".join(secret.splitlines()[1:-1]).decode()
    assert body[:20] not in str(info.value)
    assert "PRIVATE KEY" not in str(info.value)


def test_swapped_cert_and_key_say_swapped_not_chmod(tmp_path: Path) -> None:
    """--ca-cert and --ca-key given the other way round: the error says so, and no chmod advice.

    The certificate (0644) in the key's place must not be mistaken for a key readable by others.
    """
    cert_path, key_path = _ca_files(tmp_path)
    with pytest.raises(CAError) as info:
        CertificateAuthority.load(str(key_path), str(cert_path))
    assert info.value.setting == "ca_key"
    message = str(info.value)
    assert "holds a certificate, not a private key" in message
    assert "swapped" in message
    assert "chmod" not in message


def test_key_of_a_foreign_group_says_group_not_others(tmp_path: Path) -> None:
    """A 0440 key of another group is refused for that group's access, named as such."""
    if os.geteuid() != 0:
        unavailable("needs root to give the key another group")
    cert_path, key_path = _ca_files(tmp_path)
    key_path.chmod(0o440)
    foreign = os.getegid() + 1
    os.chown(key_path, -1, foreign)
    with pytest.raises(CAError) as info:
        CertificateAuthority.load(str(cert_path), str(key_path))
    message = str(info.value)
    assert "others" not in message
    assert f"readable by group {foreign} (mode 440)" in message
    assert f"not the proxy's group {os.getegid()}" in message


def test_key_readable_by_our_own_group_is_accepted(tmp_path: Path) -> None:
    """0440 with the proxy's own group (a Kubernetes Secret with fsGroup) loads."""
    cert_path, key_path = _ca_files(tmp_path)
    key_path.chmod(0o440)
    os.chown(key_path, -1, os.getegid())
    CertificateAuthority.load(str(cert_path), str(key_path))


def test_repr_never_shows_the_key(ca: CertificateAuthority) -> None:
    """The CA's repr names its subject only."""
    assert "PRIVATE" not in repr(ca)
    assert "interception CA" in repr(ca)
