"""A TCP proxy in front of the real S3 server that freezes one chosen request halfway through its body.

    with StallProxy('127.0.0.1', s3.port, rb'PUT /bucket/ds/prores_data\\.json ') as proxy:
        writer = subprocess.Popen(..., env={..., 'S3_ENDPOINT_URL': proxy.url})
        assert proxy.stalled.wait(60)       # the writer is now blocked in the middle of that upload
        writer.kill()                       # the server has seen only part of the request

The server stays the real one (it stores, authenticates and answers every other request); the proxy only
decides where a writer stops. It reads plain HTTP: S3 clients name the object in the request line
(path-style addressing, as with an endpoint URL). Of the first request whose line matches `pattern`,
the line and half of the rest of the chunk it came in are forwarded, and nothing of that connection
after it, so the server holds an unfinished request that never completes.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from typing import Any

from tests.support.helpers import free_port


class StallProxy:
    def __init__(self, host: str, port: int, pattern: bytes):
        self.upstream = (host, port)
        self.pattern = re.compile(pattern)
        self.stalled = threading.Event()
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self._server = socket.create_server(('127.0.0.1', self.port))
        self._sockets: list[socket.socket] = []
        self._closed = False

    def __enter__(self) -> StallProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._closed = True
        for s in [self._server, *self._sockets]:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                match = self.pattern.search(data) if requests and not self.stalled.is_set() else None
                if match:
                    # The request line and half of what follows it in this chunk (headers, maybe body) go
                    # through; the rest of this connection is held for ever.
                    dst.sendall(data[: match.end() + (len(data) - match.end()) // 2])
                    self.stalled.set()
                    return
                dst.sendall(data)
        except OSError:
            pass
