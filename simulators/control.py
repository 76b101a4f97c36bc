"""The HTTP control API helpers every simulator shares: JSON bodies checked, bad input as 400."""

from __future__ import annotations

from typing import Any

from aiohttp import web


@web.middleware
async def bad_request(request: web.Request, handler: Any) -> web.StreamResponse:
    """A ValueError from a handler (bad JSON, a bad field, an unknown unit or mode) is a 400."""
    try:
        response: web.StreamResponse = await handler(request)
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return response


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise ValueError(f"body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")  # noqa: TRY004 - answered as 400
    return body


def body_bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if not isinstance(value, bool):
        raise ValueError(f"{key!r} must be true or false")  # noqa: TRY004 - answered as 400
    return value


def body_opt_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{key!r} must be an integer")
    return value
