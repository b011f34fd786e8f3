"""The main process's TE listener: a TCP server that TEs connect to, which proves who they are.

Two kinds of TE come here: one a Ray node agent starts on another host (`scaling/ray_backend.py`;
the agent dials and sends the `Hello`, then hands the socket over), and one that outlived a
main process and reconnects to the restarted one (`flowserve/te_shell.py: TEShell.rejoin`).
A connection counts only if its first frame, within 5 s, is `Hello` with an id the main
process expects and that id's secret (compared in constant time): the secret made for that
one start, or the one a TE made at start and reported in its `Ready` (kept in the state dir
for a restart). Anything else is closed unread; once the main process has re-adopted what
it will (`settled`), a TE it does not know (failed meanwhile, or its socket broke while this
main process lived) is told to `Stop` instead of waiting out its grace. `--te-port` pins
the port for firewalls; a restart takes the port its TEs know.
"""
import asyncio
import hmac
import logging
import secrets
import socket

from flowserve.protocol import BadFrame, Hello, Stop, expect, next_frame, pack

log = logging.getLogger("deepflow.te_listener")
HELLO_TIMEOUT_S = 5

Arrival = tuple[asyncio.StreamReader, asyncio.StreamWriter, bytearray]  # a TE's streams, and what they read ahead


class TEListener:
    def __init__(self, host: str):
        self.host, self.address = host, ""
        self.expected: dict[str, tuple[bytes, asyncio.Future[Arrival]]] = {}
        self.server: asyncio.Server | None = None
        self.settled = False  # the main process adopted the TEs it will: an unknown one is told to stop

    async def start(self, port: int = 0) -> None:
        """Listen on `port` of the host's address (0: a free one)."""
        self.server = await asyncio.start_server(self._on_connection, self.host, port, reuse_address=True)
        self.address = f"{self.host}:{self.server.sockets[0].getsockname()[1]}"

    def expect(self, te_id: str, secret: bytes | None = None) -> tuple[bytes, asyncio.Future[Arrival]]:
        """Wait for TE `te_id`, which will show `secret` (None: a new one, returned for its
        start); the future gets its streams."""
        secret, arrived = secret or secrets.token_bytes(32), asyncio.get_running_loop().create_future()
        self.expected[te_id] = (secret, arrived)
        return secret, arrived

    def settle(self) -> None:
        self.settled = True

    def forget(self, te_id: str) -> None:
        self.expected.pop(te_id, None)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer, buf = writer.get_extra_info("peername"), bytearray()
        try:
            hello = expect(await asyncio.wait_for(next_frame(reader, buf), HELLO_TIMEOUT_S), Hello)
        except (BadFrame, TimeoutError, ConnectionError) as e:
            hello, why = None, str(e) or type(e).__name__
        else:
            why = "closed before its hello"
        entry = self.expected.get(hello.te_id) if hello else None
        if entry is None or not hmac.compare_digest(hello.secret, entry[0]) or entry[1].done():
            log.warning("TE connection from %s refused: %s", peer, "wrong TE id or secret" if hello else why)
            if hello and entry is None and self.settled:
                writer.write(pack(Stop()))
            writer.close()
            return
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        entry[1].set_result((reader, writer, buf))

    def close(self) -> None:
        if self.server:
            self.server.close()
