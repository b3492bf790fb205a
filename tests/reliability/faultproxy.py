"""A fault-injecting TCP proxy on loopback, in front of the moto S3 server.

From the client's point of view the proxy *is* the S3 endpoint, so it can be stopped (connection
refused), restarted on the same port, made to reset every connection, or made to cut a request
body part-way (a mid-upload network failure) while the storage behind it keeps its state, as a
real S3/MinIO keeps its disks across a network outage. Used by ``test_s3_faults.py``.
"""

from __future__ import annotations

import socket
import threading
import time


class FaultProxy:
    def __init__(self, upstream_port: int, port: int = 0):
        self.upstream = ("127.0.0.1", upstream_port)
        self.port = port
        self.mode = "up"  # up | reset
        self.cut: dict[bytes, list[int]] = {}  # marker in a PUT request line -> [bytes to pass, times left]
        self.cuts_done = 0
        self.attempts: list[float] = []  # accept times (every connection the client opened)
        self.requests: list[bytes] = []  # request lines seen
        self.on_request = None  # optional callback(request_line: bytes), e.g. to start an outage
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        self.port = ls.getsockname()[1]
        ls.listen(64)
        self._listener = ls
        threading.Thread(target=self._accept_loop, args=(ls,), daemon=True).start()

    def stop(self) -> None:
        """Close the listener and every open connection: the endpoint refuses connections."""
        ls, self._listener = self._listener, None
        if ls is not None:
            try:
                ls.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            ls.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            _close(c)

    # -- internals -------------------------------------------------------------------------
    def _accept_loop(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            self.attempts.append(time.monotonic())
            if self.mode == "reset":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # RST
                continue
            try:
                up = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                _close(client)
                continue
            up.settimeout(None)
            with self._lock:
                self._conns.update((client, up))
            threading.Thread(target=self._pump, args=(client, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        budget = None  # bytes of the current request still allowed through (cut mode)
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream and data[:4] in (b"PUT ", b"POST", b"GET ", b"HEAD", b"DELE"):
                    line = data.split(b"\r\n", 1)[0]
                    self.requests.append(line)
                    if self.on_request is not None:
                        self.on_request(line)
                    budget = None
                    if line.startswith(b"PUT "):
                        with self._lock:
                            for marker, spec in self.cut.items():
                                if marker in line and spec[1] > 0:
                                    spec[1] -= 1
                                    budget = spec[0]
                                    break
                if budget is not None:
                    if len(data) >= budget:
                        dst.sendall(data[:budget])
                        self.cuts_done += 1
                        break  # the network dies mid-body: both ends are closed below
                    budget -= len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
