"""E-mail through a real SMTP server (aiosmtpd): over STARTTLS and implicit TLS with a verified certificate
and a login; a server that offers no STARTTLS is refused and nothing is sent to it in the clear."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from email import message_from_bytes
from email.policy import default
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from examwatch.channels.base import SendError
from examwatch.channels.email import send
from examwatch.gateway.notify.messages import Item, Links, alarm_message
from examwatch.gateway.notify.settings import Channel
from examwatch.simulators.broker import free_port

T0 = 1780000000.0


def make_cert(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    crt, pem = tmp / "smtp.crt", tmp / "smtp.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return crt, pem


class Inbox:
    def __init__(self) -> None:
        self.mails: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd's handler hook
        self.mails.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


def _login(server, session, envelope, mechanism, auth_data):
    return AuthResult(success=(auth_data.login, auth_data.password) == (b"gw", b"pw"))


@pytest.fixture
def smtp(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Inbox, int, Path]]:
    crt, key = make_cert(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, key)
    inbox, port = Inbox(), free_port()
    mode = request.param
    kwargs = {
        "starttls": {"tls_context": ctx, "require_starttls": True, "authenticator": _login},
        "implicit": {"ssl_context": ctx, "authenticator": _login, "auth_require_tls": False},
        "plain": {"authenticator": _login, "auth_require_tls": False},
    }[mode]
    server = Controller(inbox, hostname="127.0.0.1", port=port, **kwargs)
    server.start()
    yield inbox, port, crt
    server.stop()


def message():
    return alarm_message(
        key="s1/101/r/1:raised:2",
        kind="raised",
        item=Item(id="s1/101/r/1", site="s1", room="101", rule="r", level=2, starts_at=T0, summary="录像中断"),
        device="nvr",
        value=None,
        metric="",
        action="立即检查录像机",
        deadlines=[600.0, 1800.0],
        links=Links(),
    )


def channel(port: int, crt: Path, tls: str) -> Channel:
    return Channel(
        name="mail",
        type="email",
        host="127.0.0.1",
        port=port,
        tls=tls,
        username="gw",
        password="pw",
        sender="examwatch@county.example",
        to=["office@county.example", "lead@county.example"],
        ca_file=str(crt),
        timeout=10,
    )


@pytest.mark.parametrize("smtp,tls", [("starttls", "starttls"), ("implicit", "implicit")], indirect=["smtp"])
def test_mail_arrives_over_tls_with_the_chinese_alarm(smtp, tls):
    inbox, port, crt = smtp
    send(channel(port, crt, tls), message(), None, T0)
    [(sender, to, data)] = inbox.mails
    assert sender == "examwatch@county.example" and to == ["office@county.example", "lead@county.example"]
    mail = message_from_bytes(data, policy=default)
    assert mail["Subject"] == "【二级告警】s1 101：录像中断"
    body = mail.get_content()
    assert "处置：立即检查录像机" in body and "时限：请于 04:36 前上报领导小组，04:56 前决策" in body
    assert mail["X-Examwatch-Thread"] == "s1/101/r/1"


@pytest.mark.parametrize("smtp", ["plain"], indirect=True)
def test_a_server_without_starttls_is_refused_and_gets_nothing(smtp):
    inbox, port, crt = smtp
    with pytest.raises(SendError) as err:
        send(channel(port, crt, "starttls"), message(), None, T0)
    assert err.value.reason == "tls" and inbox.mails == []


@pytest.mark.parametrize("smtp", ["starttls"], indirect=True)
def test_an_untrusted_certificate_is_refused(smtp, tmp_path):
    inbox, port, _ = smtp
    other, _ = make_cert(tmp_path / "other" if (tmp_path / "other").mkdir() is None else tmp_path)
    with pytest.raises(SendError) as err:
        send(channel(port, other, "starttls"), message(), None, T0)
    assert err.value.reason == "tls" and inbox.mails == []
