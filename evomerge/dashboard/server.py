"""Serving the dashboard: the standard library's WSGI server, one thread per request.

Threads, because optuna-dashboard's page loads several API calls at once and a slow storage
must not freeze the evomerge pages; wsgiref, because the dashboard is for a few users and
should add no dependency.
"""

from __future__ import annotations

import socket
import socketserver
import sys
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from evomerge.dashboard.app import DashboardApp, DashboardConfig
from evomerge.dashboard.security import DashboardError, redact


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(WSGIRequestHandler):
    """Request log lines without the access token a URL may carry."""

    def log_message(self, format: str, *args) -> None:
        sys.stderr.write(redact(f"{self.address_string()} - [{self.log_date_time_string()}] {format % args}\n"))


def make_http_server(app, host: str, port: int) -> WSGIServer:
    """Bound and ready; port 0 picks a free port (see `server.server_port`)."""
    server_class = _Server6 if ":" in host else _Server
    if not (isinstance(port, int) and 0 <= port <= 65535):
        raise DashboardError(f"port {port!r} is not a TCP port; give --port between 0 and 65535 "
                             "(0 picks a free one)")
    try:
        return make_server(host.strip("[]"), port, app, server_class=server_class, handler_class=_Handler)
    except (OSError, OverflowError) as exc:
        raise DashboardError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}; "
                             "choose another --port or --host") from None


def url_of(host: str, port: int) -> str:
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def serve(config: DashboardConfig, quiet: bool = False) -> None:
    """Run until interrupted; refuses (DashboardError) to bind off loopback without a token."""
    app = DashboardApp(config)
    server = make_http_server(app, config.host, config.port)
    url = url_of(config.host, server.server_port)
    if not quiet:
        print(f"evomerge dashboard on {url} (optuna-dashboard at {url}dashboard)")
        print(f"  storages: {', '.join(app.storages.urls) or 'none yet (none under ./runs)'}")
        print(f"  exports under {app.export_root}")
        if config.token:
            print(f"  open {url}?token=<your token> once; the browser keeps it in a cookie")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> tuple[WSGIServer, str]:
    """For tests and notebooks: serve `app` in a daemon thread; stop with `server.shutdown()`."""
    server = make_http_server(app, host, port)
    threading.Thread(target=server.serve_forever, name="evomerge-dashboard", daemon=True).start()
    return server, url_of(host, server.server_port)
