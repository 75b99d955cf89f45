"""A TCP relay on loopback that stands in for a host going away: :meth:`HostRelay.cut` resets every connection
it relays (the peer sees a reset, not a polite close, as when a host or its network fails), and with
``stay_down`` refuses every later connection too (the host does not come back).

A cut closes with a reset because a polite shutdown alone leaves an uploader's writes filling kernel buffers
until a timeout. A subclass may slow the relay down by overriding :meth:`HostRelay._pump`.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType


class HostRelay:
    """Relays 127.0.0.1:``port`` to ``target`` until :meth:`cut`; use it as a context manager."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        #: How many connections were relayed (a test can tell a fresh connection was tried).
        self.accepted = 0
        self.down = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self.down:
                    _reset(client)
                    _reset(server)
                    continue
                self.accepted += 1
                self._sockets += [client, server]
                for source, sink in ((client, server), (server, client)):
                    thread = threading.Thread(target=self._pump, args=(source, sink), daemon=True)
                    self._threads.append(thread)
                    thread.start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def cut(self, *, stay_down: bool = False) -> None:
        """Reset every relayed connection; with ``stay_down``, refuse new ones from now on."""
        with self._lock:
            if stay_down:
                self.down = True
                _stop_listening(self._listener)
            sockets, self._sockets = self._sockets, []
            pumps, self._threads = self._threads, []
        for sock in sockets:
            _reset(sock)
        # A socket's reset goes out only once no thread is blocked on it any more: wait for the pumps to
        # let go, so the peer's next send fails instead of filling buffers on a loaded machine.
        for thread in pumps:
            thread.join(timeout=5)

    def close(self) -> None:
        self.cut(stay_down=True)
        self._accepting.join(timeout=5)

    def __enter__(self) -> HostRelay:
        return self

    def __exit__(self, _type: type[BaseException] | None, _value: BaseException | None,
                 _traceback: TracebackType | None) -> None:
        self.close()


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset (no lingering), waking a thread blocked on it first."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _stop_listening(listener: socket.socket) -> None:
    # A shutdown wakes the thread blocked in accept() (a close alone may not, on Linux).
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)
    listener.close()
