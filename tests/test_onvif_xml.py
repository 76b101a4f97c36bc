"""XML from cameras: DTDs, entities, external resources and oversized replies are refused."""

from __future__ import annotations

import subprocess
import sys
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zeep
from aiohttp import web
from requests import Response
from requests.structures import CaseInsensitiveDict

from drivers.onvif.xmlsafe import (
    CappedSession,
    UnsafeXml,
    as_unsafe_xml,
    harden_camera,
    import_onvif,
    parse_xml,
    refuse_unsafe_xml,
    safe_settings,
)

ROOT = Path(__file__).resolve().parents[1]
PASSWD_LINE = (
    Path("/etc/passwd").read_text().splitlines()[0] if Path("/etc/passwd").exists() else "root:x:0:0"
)

XXE_FILE = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<r>&x;</r>"""
XXE_HTTP = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY x SYSTEM "http://127.0.0.1:1/secret">]>
<r>&x;</r>"""
EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE r SYSTEM "http://127.0.0.1:1/evil.dtd">
<r>x</r>"""
PARAMETER_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>
<r/>"""
BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<lolz>&lol9;</lolz>"""
QUADRATIC = (
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "' + b"A" * 50_000 + b'">]><r>' + b"&a;" * 20_000 + b"</r>"
)

HOSTILE = {
    "xxe_file": XXE_FILE,
    "xxe_http": XXE_HTTP,
    "external_dtd": EXTERNAL_DTD,
    "parameter_entity": PARAMETER_ENTITY,
    "billion_laughs": BILLION_LAUGHS,
    "quadratic_blowup": QUADRATIC,
}


def assert_no_leak(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    assert PASSWD_LINE not in text
    assert "root:" not in str(exc)
    assert len(str(exc)) < 300  # the refused document is never echoed


# --- our own parser ------------------------------------------------------------------


@pytest.mark.parametrize("doc", HOSTILE.values(), ids=HOSTILE.keys())
def test_parse_xml_refuses_dtds_and_entities(doc: bytes) -> None:
    with pytest.raises(UnsafeXml) as info:
        parse_xml(doc, max_bytes=2_000_000)
    assert info.value.reason in {"dtd", "malformed"}
    assert_no_leak(info.value)


def test_parse_xml_refuses_oversized_before_parsing() -> None:
    doc = b"<r>" + b"x" * 2000 + b"</r>"
    with pytest.raises(UnsafeXml) as info:
        parse_xml(doc, max_bytes=1000)
    assert info.value.reason == "too_large"


def test_parse_xml_refuses_malformed_and_text() -> None:
    with pytest.raises(UnsafeXml) as info:
        parse_xml(b"<r><unclosed></r>", max_bytes=1000)
    assert info.value.reason == "malformed"
    with pytest.raises(TypeError):
        parse_xml("<r/>", max_bytes=1000)  # type: ignore[arg-type]


def test_parse_xml_refuses_deep_nesting() -> None:
    doc = b"<a>" * 300_000 + b"</a>" * 300_000  # beyond libxml2's depth limit without huge_tree
    with pytest.raises(UnsafeXml) as info:
        parse_xml(doc, max_bytes=10_000_000)
    assert info.value.reason == "malformed"


def test_parse_xml_parses_ordinary_camera_xml() -> None:
    root = parse_xml(
        b'<?xml version="1.0" encoding="UTF-8"?><!-- c --><tt:X xmlns:tt="http://www.onvif.org/ver10/schema">'
        b"<tt:Y>1 &amp; 2</tt:Y></tt:X>",
        max_bytes=1000,
    )
    assert root[0].text == "1 & 2"


# --- zeep with the settings we give it -----------------------------------------------


@pytest.fixture(scope="module")
def events_client() -> zeep.Client:
    onvif = import_onvif()
    from onvif.transport import ASYNC_TRANSPORT

    wsdl = Path(onvif.__file__).parent / "wsdl" / "events.wsdl"
    return zeep.Client(str(wsdl), transport=ASYNC_TRANSPORT, settings=safe_settings())


def soap(body_doctype: bytes) -> bytes:
    """A PullMessages reply whose prolog carries ``body_doctype`` and whose body uses &x;."""
    return (
        b'<?xml version="1.0"?>'
        + body_doctype
        + b'<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope"'
        b' xmlns:tev="http://www.onvif.org/ver10/events/wsdl"><env:Body><tev:PullMessagesResponse>'
        b"<tev:CurrentTime>2024-01-01T00:00:00Z</tev:CurrentTime>"
        b"<tev:TerminationTime>2024-01-01T00:10:00Z</tev:TerminationTime>"
        b"</tev:PullMessagesResponse></env:Body></env:Envelope>"
    )


SOAP_HOSTILE = {
    "xxe_file": soap(b'<!DOCTYPE env:Envelope [<!ENTITY x SYSTEM "file:///etc/passwd">]>'),
    "xxe_http": soap(b'<!DOCTYPE env:Envelope [<!ENTITY x SYSTEM "http://127.0.0.1:1/">]>'),
    "external_dtd": soap(b'<!DOCTYPE env:Envelope SYSTEM "http://127.0.0.1:1/evil.dtd">'),
    "billion_laughs": soap(BILLION_LAUGHS.split(b"?>", 1)[1].split(b"<lolz>")[0]),
    "plain_dtd": soap(b"<!DOCTYPE env:Envelope>"),
}


def process(client: zeep.Client, content: bytes) -> Any:
    response = Response()
    response._content = content
    response.status_code = 200
    response.headers = CaseInsensitiveDict({"Content-Type": "application/soap+xml"})
    binding = client.wsdl.bindings["{http://www.onvif.org/ver10/events/wsdl}PullPointSubscriptionBinding"]
    return binding.process_reply(client, binding.get("PullMessages"), response)


def test_zeep_parses_a_normal_reply_with_safe_settings(events_client: zeep.Client) -> None:
    result = process(events_client, soap(b""))
    assert result.NotificationMessage == []


@pytest.mark.parametrize("doc", SOAP_HOSTILE.values(), ids=SOAP_HOSTILE.keys())
def test_zeep_with_safe_settings_refuses_dtds(events_client: zeep.Client, doc: bytes) -> None:
    with pytest.raises(UnsafeXml) as info, refuse_unsafe_xml():
        process(events_client, doc)
    assert info.value.reason == "dtd"
    assert_no_leak(info.value)


def test_library_defaults_are_hardened_by_import_onvif() -> None:
    import_onvif()
    import onvif.settings

    settings = onvif.settings.DEFAULT_SETTINGS
    assert (settings.forbid_dtd, settings.forbid_entities, settings.forbid_external) == (True, True, True)
    assert settings.xml_huge_tree is False


def test_refuse_unsafe_xml_passes_other_errors_through() -> None:
    with pytest.raises(zeep.exceptions.Fault), refuse_unsafe_xml():
        raise zeep.exceptions.Fault("camera said no")
    assert as_unsafe_xml(ValueError("x")) is None
    entity = zeep.exceptions.EntitiesForbidden("x", "root:x:0:0")
    unsafe = as_unsafe_xml(entity)
    assert unsafe is not None
    assert unsafe.reason == "entity"
    assert "root:" not in str(unsafe)


# --- the driver's path: ONVIFCamera, hardened, against a hostile camera --------------------

_GOOD = (
    b'<?xml version="1.0"?><env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope"'
    b' xmlns:tds="http://www.onvif.org/ver10/device/wsdl" xmlns:tt="http://www.onvif.org/ver10/schema">'
    b"<env:Body><tds:GetSystemDateAndTimeResponse><tds:SystemDateAndTime>"
    b"<tt:DateTimeType>NTP</tt:DateTimeType><tt:DaylightSavings>false</tt:DaylightSavings>"
    b"</tds:SystemDateAndTime></tds:GetSystemDateAndTimeResponse></env:Body></env:Envelope>"
)


class HostileCamera:
    """A device_service endpoint that answers whatever the test sets in ``reply``."""

    def __init__(self) -> None:
        self.reply: bytes = _GOOD
        self.chunked = False
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        if not self.chunked:
            return web.Response(body=self.reply, content_type="application/soap+xml")
        response = web.StreamResponse(headers={"Content-Type": "application/soap+xml"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(0, len(self.reply), 65536):
            try:
                await response.write(self.reply[i : i + 65536])
            except ConnectionError:  # the client hung up once it had enough
                break
        return response


async def snapshot(_: web.Request) -> web.Response:
    return web.Response(body=b"\xff\xd8" + b"\0" * 4096, content_type="image/jpeg")


@pytest.fixture
async def hostile_camera() -> AsyncIterator[HostileCamera]:
    camera = HostileCamera()
    app = web.Application()
    app.router.add_post("/onvif/device_service", camera.handle)
    app.router.add_get("/snapshot.jpg", snapshot)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    camera.port = runner.addresses[0][1]
    yield camera
    await runner.cleanup()


@pytest.fixture
async def devicemgmt(hostile_camera: HostileCamera) -> AsyncIterator[Any]:
    onvif = import_onvif()
    cam = onvif.ONVIFCamera("127.0.0.1", hostile_camera.port, "user", "pass", no_cache=True)
    harden_camera(cam, max_bytes=256 * 1024, snapshot_max_bytes=1024)
    try:
        service = await cam.create_devicemgmt_service()
        yield service
    finally:
        await cam.close()


async def test_hardened_camera_reads_a_normal_reply(devicemgmt: Any) -> None:
    assert isinstance(devicemgmt.transport.session, CappedSession)
    result = await devicemgmt.GetSystemDateAndTime()
    assert result.DateTimeType == "NTP"


@pytest.mark.parametrize("name", ["xxe_file", "xxe_http", "billion_laughs", "external_dtd"])
async def test_hardened_camera_refuses_hostile_replies(
    hostile_camera: HostileCamera, devicemgmt: Any, name: str
) -> None:
    hostile_camera.reply = _GOOD.replace(
        b"<env:Envelope",
        SOAP_HOSTILE[name].split(b"?>", 1)[1].split(b"<env:Envelope")[0] + b"<env:Envelope",
        1,
    )
    with pytest.raises(UnsafeXml) as info, refuse_unsafe_xml():
        await devicemgmt.GetSystemDateAndTime()
    assert info.value.reason == "dtd"
    assert_no_leak(info.value)


@pytest.mark.parametrize("chunked", [False, True], ids=["content_length", "chunked"])
async def test_hardened_camera_refuses_oversized_replies(
    hostile_camera: HostileCamera, devicemgmt: Any, chunked: bool
) -> None:
    hostile_camera.chunked = chunked
    hostile_camera.reply = _GOOD.replace(b"<env:Body>", b"<env:Body><!--" + b"x" * 600_000 + b"-->", 1)
    with pytest.raises(UnsafeXml) as info, refuse_unsafe_xml():
        await devicemgmt.GetSystemDateAndTime()
    assert info.value.reason == "too_large"
    # The connection was dropped, not poisoned: the next call works.
    hostile_camera.chunked = False
    hostile_camera.reply = _GOOD
    assert (await devicemgmt.GetSystemDateAndTime()).DateTimeType == "NTP"


async def test_harden_camera_is_idempotent_and_caps_snapshots(hostile_camera: HostileCamera) -> None:
    onvif = import_onvif()
    cam = onvif.ONVIFCamera("127.0.0.1", hostile_camera.port, "user", "pass", no_cache=True)
    try:
        harden_camera(cam, snapshot_max_bytes=1024)
        wrapped = cam.create_onvif_service
        harden_camera(cam)
        assert cam.create_onvif_service is wrapped
        assert isinstance(cam._snapshot_client, CappedSession)
        assert cam._snapshot_client.max_bytes == 1024
        assert not isinstance(cam._snapshot_client.wrapped, CappedSession)
        response = await cam._snapshot_client.get(f"http://127.0.0.1:{hostile_camera.port}/snapshot.jpg")
        with pytest.raises(UnsafeXml) as info:
            await response.read()
        assert info.value.reason == "too_large"
    finally:
        await cam.close()


# --- import_onvif ------------------------------------------------------------------------


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_plain_import_configures_root_logging() -> None:
    """The quirk import_onvif exists for (if this fails, the library stopped doing it)."""
    out = _run("import logging, onvif; r = logging.getLogger(); print(len(r.handlers), r.level)")
    assert out == f"1 {20}"


def test_import_onvif_leaves_root_logging_alone() -> None:
    out = _run(
        "import logging\n"
        "from drivers.onvif.xmlsafe import import_onvif\n"
        "m = import_onvif()\n"
        "r = logging.getLogger()\n"
        "from onvif.settings import DEFAULT_SETTINGS as s\n"
        "print(m.__name__, len(r.handlers), r.level, s.forbid_dtd, s.xml_huge_tree)"
    )
    assert out == "onvif 0 30 True False"


def test_import_onvif_keeps_existing_handlers() -> None:
    out = _run(
        "import logging\n"
        "h = logging.StreamHandler(); logging.getLogger().addHandler(h); logging.getLogger().setLevel(10)\n"
        "from drivers.onvif.xmlsafe import import_onvif\n"
        "import_onvif(); import_onvif()\n"
        "r = logging.getLogger()\n"
        "print(r.handlers == [h], r.level)"
    )
    assert out == "True 10"
