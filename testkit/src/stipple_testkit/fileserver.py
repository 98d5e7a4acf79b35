"""A local HTTP file server that misbehaves on request, for testing downloads offline.

`FileServer` serves byte strings on 127.0.0.1 (a port of its own) with Range support and
can be told, per path, to fail with a status, drop the connection after N bytes, ignore
Range, stall, trickle, send no Content-Length (closing the connection, or chunked), label
the body with a Content-Encoding, redirect, or send a Content-Disposition file name. It logs
every request (with its Range and If-Range headers) so tests can check what was asked.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


@dataclass
class Served:
    """One file and how to misbehave while serving it."""

    body: bytes
    filename: str | None = None
    """Sent as ``Content-Disposition: attachment; filename="..."`` when set."""
    status: int = 200
    """Anything but 200 is sent instead of the file (500, 404, ...)."""
    drop_after: int | None = None
    """Close the connection after this many body bytes (`drops` times)."""
    drops: int = 1
    ignore_range: bool = False
    stall_before_s: float = 0.0
    """Sleep this long before answering (a hanging server)."""
    stall_after: int | None = None
    """Stall `stall_s` after sending this many body bytes."""
    stall_s: float = 0.0
    chunk_bytes: int = 64 * 1024
    chunk_delay_s: float = 0.0
    send_length: bool = True
    chunked: bool = False
    """Send the body with Transfer-Encoding: chunked (no Content-Length)."""
    content_encoding: str | None = None
    """Sent as Content-Encoding; the body is sent as given (compress it yourself)."""
    redirect_to: str | None = None
    """Answer `status` (302 unless set otherwise) with this Location instead of the file."""
    etag: str | None = field(default=None)

    def __post_init__(self) -> None:
        if self.etag is None:
            self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'


@dataclass(frozen=True)
class Request:
    path: str
    range: str | None
    if_range: str | None
    status: int


class FileServer:
    """``with FileServer() as server: server.add("/a.bin", Served(b"..."))``; `url(path)`."""

    def __init__(self) -> None:
        self.files: dict[str, Served] = {}
        self.log: list[Request] = []
        self._lock = threading.Lock()
        handler = _make_handler(self)
        self._httpd = _QuietServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="file-server", daemon=True
        )

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, served: Served) -> str:
        """Serve `served` at `path`; return its URL."""
        with self._lock:
            self.files[path.split("?", 1)[0]] = served
        return self.url(path)

    def requests(self, path: str) -> list[Request]:
        """The requests made for `path` (query ignored), in order."""
        with self._lock:
            return [r for r in self.log if r.path == path.split("?", 1)[0]]

    def _record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)


class _QuietServer(ThreadingHTTPServer):
    """Does not print a traceback when a client hangs up (tests abort downloads on purpose)."""

    def handle_error(self, request: object, client_address: object) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def _make_handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            served = server.files.get(path)
            wanted, if_range = self.headers.get("Range"), self.headers.get("If-Range")
            if served is None:
                return self._answer(path, wanted, if_range, 404)
            if served.stall_before_s:
                time.sleep(served.stall_before_s)
            if served.redirect_to is not None:
                server._record(Request(path, wanted, if_range, served.status))
                self.send_response(served.status if served.status != 200 else 302)
                self.send_header("Location", served.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if served.status != 200:
                return self._answer(path, wanted, if_range, served.status)
            body, start, status = served.body, 0, 200
            use_range = wanted and not served.ignore_range and (if_range is None or if_range == served.etag)
            match = re.fullmatch(r"bytes=(\d+)-", wanted or "") if use_range else None
            if match:
                start = int(match.group(1))
                if start >= len(body):
                    server._record(Request(path, wanted, if_range, 416))
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                status = 206
            server._record(Request(path, wanted, if_range, status))
            self.send_response(status)
            if served.chunked:
                self.send_header("Transfer-Encoding", "chunked")
            elif served.send_length:
                self.send_header("Content-Length", str(len(body) - start))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", served.etag or "")
            if served.filename:
                self.send_header("Content-Disposition", f'attachment; filename="{served.filename}"')
            if served.content_encoding:
                self.send_header("Content-Encoding", served.content_encoding)
            self.end_headers()
            self._send_body(served, body, start)
            return None

        def _send_body(self, served: Served, body: bytes, start: int) -> None:
            sent, position = 0, start
            while position < len(body):
                chunk = body[position : position + served.chunk_bytes]
                if served.drop_after is not None and served.drops > 0 and position + len(chunk) > served.drop_after:
                    chunk = body[position : served.drop_after]
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    served.drops -= 1
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if served.stall_after is not None and position >= served.stall_after and served.stall_s:
                    time.sleep(served.stall_s)
                    served.stall_s = 0.0
                self._write(served, chunk)
                sent += len(chunk)
                position += len(chunk)
                if served.chunk_delay_s:
                    self.wfile.flush()
                    time.sleep(served.chunk_delay_s)
            if served.chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _write(self, served: Served, chunk: bytes) -> None:
            if served.chunked:
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            else:
                self.wfile.write(chunk)

        def _answer(self, path: str, wanted: str | None, if_range: str | None, status: int) -> None:
            server._record(Request(path, wanted, if_range, status))
            text = f"status {status}\n".encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

    return Handler
