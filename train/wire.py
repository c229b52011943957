"""The one message format between the trusted harness and a sandboxed process: a JSON header, raw
bytes after it, file descriptors beside it. Never pickle: whatever comes out of the sandbox is
parsed as plain data, so a candidate can send wrong numbers but never code. Standard library only.
"""
from __future__ import annotations

import json
import socket
import struct

MAX_HEADER = 1 << 16
_LENGTHS = struct.Struct("!IQ")  # header bytes, payload bytes


class WireError(RuntimeError):
    """The other side sent something that is not a message."""


class HungUp(WireError):
    """The other side closed its end (it exited, or was killed)."""


def send(sock: socket.socket, header: dict, payload: bytes | memoryview = b"", fds: list[int] = ()) -> None:
    head = json.dumps(header).encode()
    prefix = _LENGTHS.pack(len(head), len(payload))
    if fds:
        socket.send_fds(sock, [prefix], list(fds))
    else:
        sock.sendall(prefix)
    sock.sendall(head)
    if len(payload):
        sock.sendall(payload)


def recv(sock: socket.socket, max_payload: int = 0, max_fds: int = 0) -> tuple[dict, bytearray, list[int]]:
    """One message; a payload over `max_payload` bytes or more than `max_fds` fds is refused."""
    if max_fds:
        data, fds, _, _ = socket.recv_fds(sock, _LENGTHS.size, max_fds)
        prefix = bytearray(data)
    else:
        prefix, fds = bytearray(), []
    prefix += _exactly(sock, _LENGTHS.size - len(prefix))
    head_len, payload_len = _LENGTHS.unpack(prefix)
    if head_len > MAX_HEADER or payload_len > max_payload:
        raise WireError(f"message too large (header {head_len} B, payload {payload_len} B)")
    try:
        header = json.loads(_exactly(sock, head_len))
    except (ValueError, RecursionError) as e:  # a header nested 30,000 deep is no message either
        raise WireError(f"bad header: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        raise WireError("bad header: not an object")
    return header, _exactly(sock, payload_len), list(fds)


def _exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise HungUp("the other side hung up")
        got += k
    return buf
