"""How a TE process comes to be, from the main process: a fresh TE-shell interpreter.

`spawn_te_shell` starts `python -m flowserve.te_shell` on a new socketpair, with a model (a
cold or DRAM-preloaded start) or without one (pre-warmed, `scaling/prewarm.py`);
`next_frame` reads the one frame such a process sends before it serves (`prewarmed` or
`ready`). Forks from the warm template are the other way in (`scaling/template.py`).
"""
import asyncio
import json
import logging
import os
import socket
import sys
from dataclasses import asdict

from flowserve.config import EngineConfig
from flowserve.wire import unpack_frames


async def spawn_te_shell(engine_cfg: EngineConfig, env: dict | None,
                         model_path: str | None) -> tuple[asyncio.subprocess.Process, socket.socket]:
    """A fresh TE-shell interpreter on a new socketpair; without a model it starts pre-warmed."""
    parent, child = socket.socketpair()
    model = ["--model", model_path] if model_path else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowserve.te_shell", "--fd", str(child.fileno()), *model,
        "--engine-config", json.dumps(asdict(engine_cfg)),
        "--log-level", logging.getLevelName(logging.getLogger().level).lower(),
        pass_fds=[child.fileno()], env={**os.environ, **(env or {})},
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        start_new_session=True)  # Ctrl-C reaches the main process only: it drains, then stops the TEs
    child.close()
    return proc, parent


async def next_frame(reader: asyncio.StreamReader, buf: bytearray) -> dict | None:
    """The next frame from a TE that is not yet serving (it sends one frame, then waits)."""
    while True:
        msgs = unpack_frames(buf)
        if msgs:
            return msgs[0]
        data = await reader.read(1 << 20)
        if not data:
            return None
        buf += data
