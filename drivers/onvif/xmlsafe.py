"""XML from cameras, parsed safely: no DTDs, no entities, no external fetches, bounded size.

Three layers, all raising :class:`UnsafeXml` (the driver converts it to
``gateway.errors.DeviceProtocolError`` with ``raise ... from exc``):

* :func:`parse_xml` for any XML the gateway parses itself.
* :func:`import_onvif` imports onvif-zeep-async without its ``logging.basicConfig`` and
  hardens the one ``zeep.Settings`` object the library shares between every service
  client, the WSDL loader and ``NotificationManager.process`` (``onvif.settings.
  DEFAULT_SETTINGS``; the library ships it with ``xml_huge_tree=True`` and DTDs allowed).
* :func:`harden_camera` caps the size of every HTTP response body an ``ONVIFCamera``
  reads (SOAP replies on each service it creates, snapshots), before zeep sees a byte.

zeep raises its own exceptions for refused XML; :func:`refuse_unsafe_xml` converts
them, so a driver wraps its ONVIF calls in ``with refuse_unsafe_xml():``.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import zeep
import zeep.exceptions
from lxml import etree

# A PullMessages reply with MessageLimit 100 from a busy camera is tens of kilobytes;
# GetCapabilities / GetServices replies are under 64 KiB on every camera seen. 1 MiB
# leaves room for verbose firmware while bounding what one reply can cost.
DEFAULT_MAX_BYTES = 1 << 20
# Snapshots are JPEG: a 4K frame at high quality stays under 4 MiB.
DEFAULT_SNAPSHOT_MAX_BYTES = 8 << 20
_READ_CHUNK = 64 * 1024


class UnsafeXml(Exception):
    """XML (or a response that would be XML) refused before or while parsing.

    ``reason`` is one of ``too_large``, ``dtd``, ``entity``, ``external``, ``malformed``.
    The message never contains the refused document.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"unsafe XML refused ({reason}){': ' + detail if detail else ''}")


def safe_settings() -> zeep.Settings:
    """zeep settings for camera XML.

    ``strict=False`` (lxml recover mode) as onvif-zeep-async uses: cameras send sloppy
    XML. ``xml_huge_tree=False`` keeps libxml2's depth and text-node limits.
    """
    return zeep.Settings(
        strict=False, xml_huge_tree=False, forbid_dtd=True, forbid_entities=True, forbid_external=True
    )


def harden_settings(settings: zeep.Settings) -> zeep.Settings:
    """Make an existing ``zeep.Settings`` refuse DTDs, entities, external fetches, huge trees."""
    settings.xml_huge_tree = False
    settings.forbid_dtd = True
    settings.forbid_entities = True
    settings.forbid_external = True
    return settings


def import_onvif() -> ModuleType:
    """Import ``onvif`` (onvif-zeep-async) without its side effects on logging, hardened.

    ``onvif.client`` calls ``logging.basicConfig(level=INFO)`` at import, which adds a
    stderr handler to the root logger and sets its level when the root has no handler
    yet. A placeholder handler makes that call a no-op; the root's handlers and level
    are restored afterwards. (It also sets the ``zeep.client`` logger to CRITICAL and
    patches ``zeep.xsd.AnySimpleType.pythonvalue`` to return text: left as they are.)
    Then the library's shared ``DEFAULT_SETTINGS`` is hardened in place.
    """
    module = sys.modules.get("onvif")
    if module is None:
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        placeholder = logging.NullHandler()
        root.addHandler(placeholder)
        try:
            module = importlib.import_module("onvif")
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
    settings_module = importlib.import_module("onvif.settings")
    harden_settings(settings_module.DEFAULT_SETTINGS)
    return module


# --- our own parsing ---------------------------------------------------------------------


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,  # entity references stay references: no expansion at all
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def parse_xml(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Parse camera XML into an lxml element, refusing anything defusedxml would refuse.

    Refused (:class:`UnsafeXml`): more than ``max_bytes``, any DOCTYPE (so any DTD,
    entity declaration or external DTD), malformed XML. Nothing is fetched: entities
    are never resolved and the parser has no network.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("parse_xml takes bytes, as read from the device")
    if len(data) > max_bytes:
        raise UnsafeXml("too_large", f"{len(data)} bytes > {max_bytes}")
    try:
        root = etree.fromstring(bytes(data), parser=_parser())
    except etree.XMLSyntaxError as exc:
        raise UnsafeXml("malformed", str(exc.msg)[:200]) from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise UnsafeXml("dtd", f"DOCTYPE {docinfo.root_name or ''}".strip())
    return root


# --- zeep's refusals -----------------------------------------------------------------------

_ZEEP_REFUSALS: tuple[tuple[type[Exception], str], ...] = (
    (zeep.exceptions.DTDForbidden, "dtd"),
    (zeep.exceptions.EntitiesForbidden, "entity"),
    (zeep.exceptions.ExternalReferenceForbidden, "external"),
    (zeep.exceptions.XMLSyntaxError, "malformed"),
)


def as_unsafe_xml(exc: BaseException) -> UnsafeXml | None:
    """The :class:`UnsafeXml` a zeep refusal stands for, or None for other exceptions."""
    if isinstance(exc, UnsafeXml):
        return exc
    for kind, reason in _ZEEP_REFUSALS:
        if isinstance(exc, kind):
            # zeep's messages may quote the entity's content: keep only the class name.
            return UnsafeXml(reason, type(exc).__name__)
    return None


@contextmanager
def refuse_unsafe_xml() -> Iterator[None]:
    """Convert zeep's DTD / entity / external-reference refusals to :class:`UnsafeXml`."""
    try:
        yield
    except zeep.exceptions.Error as exc:
        unsafe = as_unsafe_xml(exc)
        if unsafe is None:
            raise
        raise unsafe from None


# --- response size cap ---------------------------------------------------------------------


class _CappedResponse:
    """An aiohttp ``ClientResponse`` whose ``read()`` stops at ``max_bytes``.

    Reads the decompressed body stream chunk by chunk, so a gzip bomb is cut off too.
    Everything else is the wrapped response's.
    """

    def __init__(self, response: Any, max_bytes: int) -> None:
        self._response = response
        self._max_bytes = max_bytes
        self._body: bytes | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._response, name)

    async def read(self) -> bytes:
        if self._body is not None:
            return self._body
        declared = self._response.content_length
        if declared is not None and declared > self._max_bytes:
            self._response.close()
            raise UnsafeXml("too_large", f"Content-Length {declared} > {self._max_bytes}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in self._response.content.iter_chunked(_READ_CHUNK):
            size += len(chunk)
            if size > self._max_bytes:
                self._response.close()  # drop the connection: the rest is never read
                raise UnsafeXml("too_large", f"body > {self._max_bytes} bytes")
            chunks.append(chunk)
        self._response.release()
        self._body = b"".join(chunks)
        return self._body

    async def text(self, encoding: str | None = None, errors: str = "strict") -> str:
        body = await self.read()
        return body.decode(encoding or self._response.get_encoding(), errors)


class CappedSession:
    """Wraps an aiohttp ``ClientSession``: responses of ``get``/``post`` read at most ``max_bytes``."""

    def __init__(self, session: Any, max_bytes: int) -> None:
        self.wrapped = session
        self.max_bytes = max_bytes

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    async def post(self, *args: Any, **kwargs: Any) -> _CappedResponse:
        return _CappedResponse(await self.wrapped.post(*args, **kwargs), self.max_bytes)

    async def get(self, *args: Any, **kwargs: Any) -> _CappedResponse:
        return _CappedResponse(await self.wrapped.get(*args, **kwargs), self.max_bytes)


def harden_service(service: Any, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Cap response bodies and harden parse settings of one ``onvif.ONVIFService``. Idempotent.

    The service's transport (shared by its authenticated and authless zeep clients)
    reads through its ``session``: that session is wrapped. The zeep clients' settings
    are the library's shared ``DEFAULT_SETTINGS`` (hardened by :func:`import_onvif`);
    they are hardened again here in case a caller imported onvif directly.
    """
    transport = service.transport
    if not isinstance(transport.session, CappedSession):
        transport.session = CappedSession(transport.session, max_bytes)
    for client in (service.zeep_client, service.zeep_client_authless):
        if client is not None:
            harden_settings(client.settings)
    return service


def harden_camera(
    camera: Any,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    snapshot_max_bytes: int = DEFAULT_SNAPSHOT_MAX_BYTES,
) -> Any:
    """Harden an ``onvif.ONVIFCamera`` before its first call (before ``update_xaddrs``).

    Every service the camera creates goes through ``create_onvif_service`` (the
    ``create_*_service`` helpers, ``update_xaddrs``, the pull-point and notification
    managers): the instance's method is wrapped so each new service is passed through
    :func:`harden_service`. The snapshot session is capped at ``snapshot_max_bytes``.
    Idempotent.
    """
    if getattr(camera, "_campus_hardened", False):
        return camera
    create: Callable[..., Any] = camera.create_onvif_service

    async def create_onvif_service(*args: Any, **kwargs: Any) -> Any:
        return harden_service(await create(*args, **kwargs), max_bytes=max_bytes)

    camera.create_onvif_service = create_onvif_service
    for service in list(camera.services.values()):
        harden_service(service, max_bytes=max_bytes)
    if not isinstance(camera._snapshot_client, CappedSession):
        camera._snapshot_client = CappedSession(camera._snapshot_client, snapshot_max_bytes)
    camera._campus_hardened = True
    return camera
