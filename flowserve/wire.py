"""Framing for the unix socket between the main process and a TE: a 4-byte big-endian
length, then one orjson object. Plain data only (never pickle): a TE's socket is a trust
boundary, and JSON keeps the messages readable in a packet dump."""
import socket
import struct

import orjson

HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20


def pack(msg: dict) -> bytes:
    body = orjson.dumps(msg)
    return HEADER.pack(len(body)) + body


def unpack_frames(buf: bytearray, limit: int | None = None) -> list[dict]:
    """Pop every complete frame (at most `limit`) from the front of `buf`."""
    msgs = []
    while len(buf) >= HEADER.size and (limit is None or len(msgs) < limit):
        (size,) = HEADER.unpack_from(buf)
        if size > MAX_FRAME:
            raise ValueError(f"frame of {size} bytes exceeds {MAX_FRAME}")
        if len(buf) < HEADER.size + size:
            break
        msgs.append(orjson.loads(bytes(buf[HEADER.size:HEADER.size + size])))
        del buf[:HEADER.size + size]
    return msgs


def recv_frame(sock: socket.socket, buf: bytearray) -> dict | None:
    """Block until one whole frame is in `buf` (reading `sock` as needed) and pop it; None at
    EOF. Bytes past that frame stay in `buf` for the next call."""
    while not (msgs := unpack_frames(buf, 1)):
        data = sock.recv(1 << 16)
        if not data:
            return None
        buf += data
    return msgs[0]
