"""The urllib3 transport that ``data_prep.net`` does not use, kept to measure it (``bench/data_prep.py
--with-urllib3``).

``data_prep.net.Fetcher`` speaks HTTP with the standard library's ``http.client`` and its own per-thread keep-alive
connections. The project prefers well-kept libraries, so this is the same fetcher over urllib3 connection pools: the
same rules (address checks on every hop, robots.txt, https->http refused, one deadline per attempt over connect,
headers and body, retries and redirects of our own), only the transport differs. Measured with
``bench/data_prep.py --images 2000 --with-urllib3`` on 2 CPUs (2026-12-06): over urllib3 220.6 samples/s and 6.96
CPU ms/sample, over http.client 251.6 and 6.26, i.e. 0.88x (four more A/B runs: 0.86-0.92x). So ``data_prep.net``
keeps ``http.client``. Run as ``python bench/urllib3_fetcher.py ARGS``:
``python -m data_prep.download ARGS`` with this transport (builds in-process: one ``--processes``).
"""

from __future__ import annotations

import http.client
import socket
import ssl
import sys
import threading
import time
import zlib
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urljoin

import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_prep import net  # noqa: E402

POOLS_MAX = 256  # hosts with open keep-alive connections, per process


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise net._download_error("timeout", True)
    return remaining


def _cause(e: BaseException) -> BaseException:
    """The innermost exception urllib3 wrapped (the socket or TLS error behind a ProtocolError/SSLError)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = (
            e.__cause__
            or e.__context__
            or next((a for a in getattr(e, "args", ()) if isinstance(a, BaseException)), None)
        )
        if inner is None:
            break
        e = inner
    return e


class Urllib3Fetcher(net.Fetcher):
    """``data_prep.net.Fetcher`` with urllib3 underneath: one ``HTTPConnectionPool`` per (scheme, host, port, checked
    address), shared by the threads; redirects, retries, the address and robots.txt checks and the deadline stay
    ours (urllib3's redirects and retries would skip the per-hop checks)."""

    def __init__(self, options: net.FetchOptions, max_connections_per_host: int = 128):
        super().__init__(options)
        self._pools: "OrderedDict[tuple, urllib3.HTTPConnectionPool]" = OrderedDict()
        self._pools_lock = threading.Lock()
        self._pool_size = max_connections_per_host

    def _fetch_once(self, url: str, robots_txt: bool = False) -> bytes:
        deadline = time.monotonic() + self.opt.timeout
        previous = None
        for _ in range(self.opt.max_redirects + 1):
            scheme, host, port, path = net.split_url(url)
            if previous == "https" and scheme == "http":
                raise net._download_error("redirect from https to http refused")
            previous = scheme
            ip = self._resolve(host, port)
            if self.opt.respect_robots_txt and not robots_txt:
                self._robots.check(scheme, host, port, path)
            resp = self._request(scheme, host, port, ip, path, deadline)
            done = False
            try:
                if resp.status in net._REDIRECTS:
                    location = resp.headers.get("Location")
                    self._read_body(resp, deadline, 1 << 20)  # drain, so that the connection is reused
                    done = True
                    if not location:
                        raise net._download_error(f"http {resp.status} without Location")
                    url = urljoin(url, location.strip())
                    continue
                if robots_txt:
                    data = self._read_robots_txt(resp, deadline)
                else:
                    data = self._check_and_read(resp, deadline)
                done = True
                return data
            finally:
                if not done:  # a body left unread: the connection cannot be reused
                    resp.close()
                resp.release_conn()
        raise net._download_error("too many redirects")

    def _read_robots_txt(self, resp: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
        if not 200 <= resp.status < 300:
            raise net.FetchError(
                "failed_to_download", f"http {resp.status}", resp.status in net._RETRY_HTTP, resp.status
            )
        return self._read_body(resp, deadline, net.ROBOTS_TXT_MAX_BYTES, truncate=True)

    def _check_and_read(self, resp: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
        if resp.status != 200:
            raise net.FetchError(
                "failed_to_download", f"http {resp.status}", resp.status in net._RETRY_HTTP, resp.status
            )
        if self.opt.respect_robots_tag:
            directive = net.opted_out(resp.headers.getlist("X-Robots-Tag"))
            if directive:
                raise net.FetchError("net.opted_out", f"X-Robots-Tag {directive}")
        ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype.startswith(net._TEXT_TYPES):
            raise net._download_error(f"not an image ({ctype})")
        data = self._read_body(resp, deadline, self.opt.max_bytes)
        encoding = (resp.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding in ("gzip", "deflate"):  # undone here, not by urllib3, so that max_bytes bounds the result
            inflater = zlib.decompressobj(47)  # gzip or zlib header, detected
            data = inflater.decompress(data, self.opt.max_bytes + 1)
            if len(data) > self.opt.max_bytes:
                raise net._download_error("too large")
        return data

    def _read_body(self, resp: urllib3.BaseHTTPResponse, deadline: float, limit: int, truncate: bool = False) -> bytes:
        """The body, at most ``limit`` bytes: longer is an error, or with ``truncate`` cut there. Every read is
        bounded by what is left of the attempt's deadline (urllib3's read timeout bounds one read, not the body:
        a server sending a byte a second would otherwise hold the thread)."""
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.strip().isdigit() else None
        if length is not None and length > limit and not truncate:
            raise net._download_error("too large")
        chunks, total = [], 0
        try:
            while True:
                remaining = _remaining(deadline)
                sock = getattr(resp.connection, "sock", None)
                if sock is not None:
                    sock.settimeout(remaining)
                chunk = resp.read1(net._CHUNK)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > limit:
                    if truncate:
                        return b"".join(chunks)[:limit]
                    raise net._download_error("too large")
        except (socket.timeout, TimeoutError, urllib3.exceptions.TimeoutError):
            raise net._download_error("timeout", True) from None
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError):  # IncompleteRead, resets
            raise net._download_error("truncated body", True) from None
        if length is not None and total < length:
            raise net._download_error("truncated body", True)
        return b"".join(chunks)

    def _pool(self, scheme: str, host: str, port: int, ip: str) -> "urllib3.HTTPConnectionPool":
        """The pool that connects to the address that passed the private-network check; the Host header and TLS
        (SNI and certificate check) keep the name."""
        key = (scheme, host, port, ip)
        with self._pools_lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            common = dict(maxsize=self._pool_size, block=False, retries=False)
            if scheme == "https":
                pool = urllib3.HTTPSConnectionPool(
                    ip, port, ssl_context=self._ssl, server_hostname=host, assert_hostname=host, **common
                )
            else:
                pool = urllib3.HTTPConnectionPool(ip, port, **common)
            self._pools[key] = pool
            while len(self._pools) > POOLS_MAX:
                self._pools.popitem(last=False)[1].close()
        return pool

    def _request(
        self, scheme: str, host: str, port: int, ip: str, path: str, deadline: float
    ) -> urllib3.BaseHTTPResponse:
        pool = self._pool(scheme, host, port, ip)
        default = 443 if scheme == "https" else 80
        name = f"[{host}]" if ":" in host else host
        headers = {**self._headers, "Host": name if port == default else f"{name}:{port}"}
        for fresh_try in (True, False):
            remaining = _remaining(deadline)
            try:
                return pool.urlopen(
                    "GET",
                    path,
                    headers=headers,
                    retries=False,
                    redirect=False,
                    assert_same_host=False,
                    preload_content=False,
                    decode_content=False,
                    release_conn=False,
                    timeout=urllib3.Timeout(connect=remaining, read=remaining),
                )
            except (urllib3.exceptions.TimeoutError, socket.timeout, TimeoutError):
                raise net._download_error("timeout", True) from None
            except urllib3.exceptions.SSLError as e:
                cause = _cause(e)
                if isinstance(cause, (ssl.SSLCertVerificationError, ssl.CertificateError)):
                    message = getattr(cause, "verify_message", None) or str(cause) or "not trusted"
                    raise net._download_error(f"tls certificate error ({message})") from None  # final: same next time
                raise net._download_error(f"connection error ({type(cause).__name__})", True) from None
            except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as e:
                cause = _cause(e)
                if fresh_try and isinstance(
                    cause, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
                ):
                    continue  # a kept-alive connection the server had closed: one more try, not counted
                if isinstance(cause, (socket.timeout, TimeoutError)):
                    raise net._download_error("timeout", True) from None
                raise net._download_error(f"connection error ({type(cause).__name__})", True) from None
        raise AssertionError("unreachable")


if __name__ == "__main__":
    from data_prep import download

    net.Fetcher = download.Fetcher = Urllib3Fetcher  # the download processor builds its fetcher in setup()
    sys.exit(download.main(sys.argv[1:]))
