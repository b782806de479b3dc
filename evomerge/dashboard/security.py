"""The dashboard's guards: who may reach it, which requests may change things, which paths it touches.

The dashboard can start processes and write files, so every check here fails closed:
- the form token (random per server start) stops other web pages from posting actions;
- the access token (required off loopback) stops other machines from using the server at all;
- the Host check stops DNS rebinding from turning a loopback server into a public one;
- `inside_root` keeps export and download paths under the export root, symlinks included.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import urlsplit

MIN_TOKEN_LENGTH = 16
TOKEN_ENV = "EVOMERGE_DASHBOARD_TOKEN"
AUTH_COOKIE = "evomerge_auth"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


class DashboardError(RuntimeError):
    """The dashboard cannot start or an action is refused; the message says why and what to do."""


class PathRefused(DashboardError):
    """A path would leave the export root (absolute, `..`, or a symlink pointing out)."""


def is_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address."""
    name = host.strip("[]")
    if name.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def same_token(given: str | None, expected: str) -> bool:
    """Constant-time comparison; a missing token never matches."""
    if not given:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


@dataclass
class Guard:
    """The tokens of one server run and the host it is bound to."""

    host: str
    access_token: str | None = None
    form_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def __post_init__(self) -> None:
        if self.access_token is not None and len(self.access_token) < MIN_TOKEN_LENGTH:
            raise DashboardError(
                f"the dashboard token must be at least {MIN_TOKEN_LENGTH} characters; make one with "
                "python -c 'import secrets; print(secrets.token_urlsafe())'")
        if not is_loopback(self.host) and not self.access_token:
            raise DashboardError(
                f"refusing to serve on {self.host}, which is not a loopback address, without an access "
                f"token: anyone who can reach it could pause, resume and export studies. Give --token T "
                f"(or set {TOKEN_ENV}), or bind 127.0.0.1 and use an SSH tunnel.")

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def host_allowed(self, host_header: str | None) -> bool:
        """On loopback, only loopback Host names: a rebound DNS name must not reach the server."""
        if not self.loopback:
            return True
        if not host_header:
            return False
        name = urlsplit(f"//{host_header}").hostname or ""
        return name in LOOPBACK_NAMES or name.endswith(".localhost") or _is_loopback_ip(name)

    def origin_allowed(self, origin: str | None, host_header: str | None) -> bool:
        """A browser's cross-site request carries a foreign Origin; same-site or none is fine."""
        if origin is None:
            return True
        return urlsplit(origin).netloc.lower() == (host_header or "").lower()

    def authenticated(self, cookie: str | None, bearer: str | None) -> bool:
        if self.access_token is None:
            return True
        return same_token(cookie, self.access_token) or same_token(bearer, self.access_token)

    def form_ok(self, given: str | None) -> bool:
        return same_token(given, self.form_token)


def _is_loopback_ip(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def redact(text: str) -> str:
    """Server logs must not keep the access token a user put in a URL."""
    return re.sub(r"(token=)[^&\s\"]*", r"\1[redacted]", text)


def inside_root(root: Path, relative: str) -> Path:
    """`root / relative`, resolved, refused unless it stays strictly under the resolved root.

    `..` and absolute paths are refused before touching the file system; resolving afterwards
    catches symlinks (inside the root) that point out of it.
    """
    if not relative or "\x00" in relative or "\\" in relative:
        raise PathRefused(f"refused path {relative!r}: give a relative path with / separators")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or PureWindowsPath(relative).drive:
        raise PathRefused(f"refused path {relative!r}: absolute paths are not allowed, give one relative "
                          "to the export root")
    if any(part == ".." for part in pure.parts):
        raise PathRefused(f"refused path {relative!r}: '..' is not allowed")
    base = root.resolve()
    target = (base / pure).resolve()
    if target == base or not target.is_relative_to(base):
        raise PathRefused(f"refused path {relative!r}: it resolves to {target}, outside the export root {base}")
    return target
