"""Idle keep-alive connections: the server holds them --keep-alive-s (75 s by default), longer
than a load balancer's or a client pool's idle timeout, so that the client side closes first.
uvicorn's own 5 s raced clients whose pools also expire at 5 s (httpx): a request sent as the
server closed the connection failed with a reset (seen under load in the fairness benchmark)."""

from __future__ import annotations

import socket
import time

from tests.e2e.server_process import ServerProcess

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _ask(conn: socket.socket) -> bytes:
    """One request on a kept-alive connection, its response read whole (head and
    Content-Length body); b"" once the server has closed the connection."""
    conn.sendall(REQUEST)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return b""
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += conn.recv(4096)
    return head


def test_an_idle_connection_outlives_uvicorns_default_and_closes_after_keep_alive_s(
        model_dir, tmp_path) -> None:
    with (ServerProcess(model_dir, tmp_path / "store", tmp_path / "a.log") as server,
          socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn):
        assert _ask(conn).startswith(b"HTTP/1.1 200")
        time.sleep(6)  # past uvicorn's default of 5 s
        assert _ask(conn).startswith(b"HTTP/1.1 200")
    with (ServerProcess(model_dir, tmp_path / "store", tmp_path / "b.log",
                        "--keep-alive-s", "1") as server,
          socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn):
        asked = time.monotonic()  # before the request: the server's idle timer starts later
        assert _ask(conn).startswith(b"HTTP/1.1 200")
        # Wait for the server to close the idle connection: well within 30 s (far below the
        # 75 s default, so the flag took effect), and not before the 1 s it was given.
        try:
            closed = conn.recv(1) == b""
        except ConnectionResetError:
            closed = True
        except TimeoutError:  # still open after 30 s
            closed = False
        idle = time.monotonic() - asked
        assert closed
        assert idle >= 1.0, idle
