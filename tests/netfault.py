"""Real network faults for tests: a TCP proxy on loopback in front of a real server (moto's S3) that
a test cuts -- every open connection reset, new ones refused, as when an endpoint goes away -- and
restores on the same port. Clients talk to the proxy's address and never know it is there."""

from __future__ import annotations

import socket
import struct
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CutProxy:
    """Forwards ``127.0.0.1:port`` to ``target`` (host, port) until ``cut()``; ``restore()`` opens it
    again. ``connections`` counts the connections it accepted (the test's evidence of traffic)."""

    def __init__(self, target: tuple[str, int], port: int | None = None) -> None:
        self.target = target
        self.port = port or free_port()
        self.connections = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._cut = threading.Event()

    @property
    def is_cut(self) -> bool:
        return self._cut.is_set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "CutProxy":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._cut.clear()
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="cut-proxy").start()
        return self

    def cut(self) -> None:
        """The endpoint goes away: connections reset, the port refuses new ones."""
        self._cut.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for s in list(self._open):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
                    s.close()
                except OSError:
                    pass
            self._open.clear()

    def restore(self) -> None:
        self.start()

    def stop(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while not self._cut.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._cut.is_set():
                    client.close()
                    upstream.close()
                    return
                self.connections += 1
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
