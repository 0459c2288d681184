"""Form fields must be valid UTF-8: a route class whose requests parse forms strictly.

Starlette decodes a form field that is not valid in its charset as Latin-1 (multipart) or
replaces the bad bytes with U+FFFD (URL-encoded), so a description in the wrong encoding would
be scored as mojibake. Here such a field is a 422 naming it instead.
"""

from __future__ import annotations

from contextlib import aclosing
from urllib.parse import unquote_to_bytes

from fastapi import HTTPException, Request
from fastapi.routing import APIRoute
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from python_multipart.multipart import parse_options_header


def _check(raw: bytes | bytearray, charset: str, field: str) -> None:
    try:
        bytes(raw).decode(charset)
    except UnicodeDecodeError as exc:
        raise HTTPException(422, f"form field {field!r}: not valid {charset} text (byte {exc.start}); "
                                 "send it as UTF-8") from None


class _StrictMultiPartParser(MultiPartParser):
    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:  # a text field, not an uploaded file
            _check(part.data, self._charset, part.field_name)
        super().on_part_end()


class _StrictFormParser(FormParser):
    def on_field_end(self) -> None:
        name = unquote_to_bytes(bytes(self._field_name).replace(b"+", b" "))
        _check(name, "utf-8", name.decode("utf-8", "replace"))
        _check(unquote_to_bytes(bytes(self._field_value).replace(b"+", b" ")), "utf-8", name.decode("utf-8"))
        super().on_field_end()


class StrictFormRequest(Request):
    """A request whose form parser refuses fields that are not valid text."""

    async def _get_form(self, *, max_files: int | float = 1000, max_fields: int | float = 1000,
                        max_part_size: int = 1024 * 1024):
        if self._form is None:
            content_type, _ = parse_options_header(self.headers.get("Content-Type"))
            parser = {b"multipart/form-data": _StrictMultiPartParser,
                      b"application/x-www-form-urlencoded": _StrictFormParser}.get(content_type)
            if parser is not None:
                limits = {"max_fields": max_fields, "max_part_size": max_part_size}
                if parser is _StrictMultiPartParser:
                    limits["max_files"] = max_files
                try:
                    async with aclosing(self.stream()) as stream:
                        self._form = await parser(self.headers, stream, **limits).parse()
                except MultiPartException as exc:
                    raise HTTPException(400, exc.message) from None
        return await super()._get_form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)


class StrictFormRoute(APIRoute):
    """An API route whose handler sees a `StrictFormRequest`."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict_handler(request: Request):
            return await handler(StrictFormRequest(request.scope, request.receive))

        return strict_handler
