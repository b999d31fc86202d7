"""A real HTTP/1.1 server on 127.0.0.1 (port 0) for the data_prep tests and benchmark, with scripted faults.

    server = LoopbackServer({"/cat.jpg": Route(jpeg_bytes), "/gone": Route(status=404)}).start()
    server.url("/cat.jpg")   # http://127.0.0.1:<port>/cat.jpg
    server.hits["/cat.jpg"]  # requests seen per path
    server.stop()

``real_photos()`` returns real photographs (scikit-image's bundled sample data, CC0/public domain) as bytes.

A ``Route`` serves ``body`` with ``status``/``content_type``/``headers`` after ``delay`` seconds, and can misbehave:
``fail_first`` (answer 500 to the first N requests), ``redirect`` (302 to that path), ``truncate_to`` (announce the
full length, send fewer bytes, close), ``stall`` (send headers and a few bytes, then hang for that many seconds),
``gate`` (a threading.Event the request waits for). Keep-alive is on, one thread per connection. Not a CLI.
``LoopbackServer(routes, tls=(certfile, keyfile))`` serves HTTPS instead (``url()`` then says ``https://``).
"""

from __future__ import annotations

import importlib.util
import ssl
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Optional, Tuple

PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "camera.png",
    "brick.png",
)


def real_photos() -> Dict[str, bytes]:
    """{file name: bytes} of real photos shipped by scikit-image (read from disk, skimage is not imported)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise RuntimeError("real test photos come from scikit-image: pip install scikit-image")
    folder = Path(spec.origin).parent / "data"
    return {name: (folder / name).read_bytes() for name in PHOTOS}


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str = "image/jpeg"
    headers: Tuple[Tuple[str, str], ...] = ()
    delay: float = 0.0
    fail_first: int = 0
    redirect: Optional[str] = None
    truncate_to: Optional[int] = None
    stall: float = 0.0
    gate: Optional[threading.Event] = field(default=None, repr=False)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: a burst of new connections (64 threads, or all threads released
    # at once after a host's robots.txt arrives) overflowed it and got resets the server never saw.
    request_queue_size = 256

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients that give up reset their connection
            super().handle_error(request, client_address)


class LoopbackServer:
    def __init__(self, routes: Dict[str, Route], tls: Optional[Tuple[str, str]] = None):
        self.routes = dict(routes)
        self.hits: Counter = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), self._handler_class())
        self.scheme = "https" if tls else "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def start(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes stalled handlers
        for route in self.routes.values():
            if route.gate is not None:
                route.gate.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _count(self, path: str) -> int:
        with self._lock:
            self.hits[path] += 1
            return self.hits[path]

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: bytes, content_type: str, headers=(), length: Optional[int] = None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                route = server.routes.get(path)
                n = server._count(path)
                if route is None:
                    return self._send(404, b"not found", "text/plain")
                if route.gate is not None:
                    route.gate.wait(60)
                if route.delay:
                    server._stop.wait(route.delay)
                if n <= route.fail_first:
                    return self._send(500, b"try again", "text/plain")
                if route.redirect is not None:
                    return self._send(302, b"", "text/plain", (("Location", route.redirect),))
                if route.stall:
                    self._send(route.status, route.body[:16], route.content_type, route.headers, len(route.body))
                    self.wfile.flush()
                    server._stop.wait(route.stall)
                    self.close_connection = True
                    return
                if route.truncate_to is not None:
                    self._send(
                        route.status,
                        route.body[: route.truncate_to],
                        route.content_type,
                        route.headers,
                        len(route.body),
                    )
                    self.close_connection = True
                    return
                self._send(route.status, route.body, route.content_type, route.headers)

        return Handler
