"""The few HTTP pieces the dashboard needs on top of WSGI: a request, a response, flash messages."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Iterable
from urllib.parse import parse_qs

from evomerge.dashboard import pages
from evomerge.dashboard.security import DashboardError

MAX_FORM_BYTES = 64 * 1024
PAGE_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Frame-Options", "DENY"), ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
]


class BadRequest(DashboardError):
    """The request itself is malformed; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    environ: dict
    method: str
    path: str
    query: dict[str, str]
    cookies: dict[str, str]

    @classmethod
    def of(cls, environ: dict) -> Request:
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()}
        jar = SimpleCookie()
        try:
            jar.load(environ.get("HTTP_COOKIE", ""))
        except CookieError:  # a malformed cookie set by another app on localhost is no reason to fail
            jar = SimpleCookie()
        return cls(environ, environ.get("REQUEST_METHOD", "GET").upper(), environ.get("PATH_INFO", "/") or "/",
                   query, {k: m.value for k, m in jar.items()})

    def header(self, name: str) -> str | None:
        return self.environ.get("HTTP_" + name.upper().replace("-", "_"))

    def form(self) -> dict[str, str]:
        """The url-encoded body of an HTML form (the only kind the pages send)."""
        ctype = (self.environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise BadRequest(415, "actions take an HTML form (application/x-www-form-urlencoded)")
        try:
            length = int(self.environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > MAX_FORM_BYTES:
            raise BadRequest(413, "form too large")
        body = self.environ["wsgi.input"].read(length).decode("utf-8", errors="replace")
        return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


@dataclass
class Response:
    status: int
    body: bytes | Iterable[bytes] = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, start_response) -> Iterable[bytes]:
        start_response(f"{self.status} {HTTPStatus(self.status).phrase}", self.headers)
        return [self.body] if isinstance(self.body, bytes) else self.body


def html(status: int, title: str, body: str, flash: tuple[str, str] | None = None) -> Response:
    text = pages.layout(title, body, flash).encode()
    return Response(status, text, [("Content-Type", "text/html; charset=utf-8"), *PAGE_HEADERS])


def error(status: int, message: str, back: str | None = None) -> Response:
    return html(status, f"{status} {HTTPStatus(status).phrase}", pages.error_html(status, message, back))


def redirect(location: str, status: int = 303, headers: list[tuple[str, str]] = ()) -> Response:
    return Response(status, b"", [("Location", location), *headers])


def attachment_name(name: str) -> str:
    return "".join(c for c in name if c.isalnum() or c in "._-") or "download"


def download(data: bytes | Path, name: str) -> Response:
    """Always an attachment of opaque type: an exported file must never render as a page here."""
    if isinstance(data, Path):
        body, size = _chunks(data), data.stat().st_size
    else:
        body, size = data, len(data)
    return Response(200, body, [
        ("Content-Type", "application/octet-stream"), ("Content-Length", str(size)),
        ("Content-Disposition", f'attachment; filename="{attachment_name(name)}"'), *PAGE_HEADERS])


def _chunks(path: Path) -> Iterable[bytes]:
    """The file in pieces, closed when the server finishes or abandons the response."""
    with open(path, "rb") as fh:
        while chunk := fh.read(65536):
            yield chunk


class Flash:
    """One-shot messages shown after an action redirects back to its page (the last 100 kept)."""

    def __init__(self) -> None:
        self._messages: dict[str, tuple[str, str]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def put(self, level: str, text: str) -> str:
        with self._lock:
            key = str(next(self._ids))
            self._messages[key] = (level, text)
            for old in list(self._messages)[:-100]:
                del self._messages[old]
            return key

    def take(self, key: str | None) -> tuple[str, str] | None:
        with self._lock:
            return self._messages.pop(key, None) if key else None
