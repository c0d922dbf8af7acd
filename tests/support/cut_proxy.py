"""A TCP proxy in front of the test S3 server that can lose the server at an exact point of an upload.

moto keeps its objects in memory, so stopping the real server would also lose every checkpoint stored
before; the proxy instead makes the server unreachable for the clients behind it, and back again:

    with CutProxy(s3.port, cut_at=rb'PUT /[^ ]*/global_step6/', nth=2) as proxy:
        env = {**s3.env, 'S3_ENDPOINT_URL': proxy.url}
        ...                 # the 2nd upload request into global_step6 never arrives; from then on every
        proxy.restore()     # connection is closed at once, as by a server that went away; until restore()

A proxy started with no `cut_at` passes everything until `arm(cut_at)`: a test can wait for a point it
observes in the store (a checkpoint's pointer written) and lose the server at the next matching request.

Requests are matched on the bytes the client sends (request lines are ASCII, checkpoint bodies do not
contain the pattern's text), across chunk boundaries.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading


class CutProxy:
    def __init__(self, target_port: int, cut_at: bytes | None = None, nth: int = 1):
        self.target_port = target_port
        self.pattern = re.compile(cut_at) if cut_at else None
        self.nth = nth
        self.seen = 0
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._server = socket.create_server(('127.0.0.1', 0))
        self.port = self._server.getsockname()[1]
        self.url = f'http://127.0.0.1:{self.port}'
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> CutProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._server.close()
        self._drop_all()

    def arm(self, cut_at: bytes, nth: int = 1) -> None:
        """From now on, the `nth` request matching `cut_at` (counted from now) is the cut."""
        with self._lock:
            self.seen, self.nth = 0, nth
            self.pattern = re.compile(cut_at)

    def restore(self) -> None:
        """The server is reachable again; no further cut."""
        self.pattern = None
        self.cut.clear()

    def _drop_all(self) -> None:
        with self._lock:
            socks, self._socks = list(self._socks), set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            upstream = socket.create_connection(('127.0.0.1', self.target_port))
            with self._lock:
                self._socks |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, inspect: bool) -> None:
        tail = b''
        try:
            while True:
                data = src.recv(65536)
                if not data or self.cut.is_set():
                    break
                if inspect and self.pattern is not None:
                    window = tail + data
                    hits = len(self.pattern.findall(window)) - len(self.pattern.findall(tail))
                    tail = window[-256:]
                    if hits:
                        with self._lock:
                            self.seen += hits
                            if self.seen >= self.nth:
                                self.cut.set()
                        if self.cut.is_set():
                            break
                dst.sendall(data)
        except OSError:
            pass
        if self.cut.is_set():
            self._drop_all()
        else:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
