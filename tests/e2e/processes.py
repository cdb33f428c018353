"""Running service roles as real processes for end-to-end and fault tests."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path


class RoleProcess:
    """One ``m365sync <role>`` process with its own log file."""

    def __init__(self, role: str, env: dict[str, str], log_path: Path) -> None:
        self.role = role
        self.env = env
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> RoleProcess:
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "processor.cli",
            self.role,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=log,
            stdin=asyncio.subprocess.DEVNULL,
        )
        log.close()
        return self

    async def wait_log(self, needle: str, timeout_s: float = 30) -> None:
        """Wait until the process logged ``needle`` (for example ``"process.ready"``)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            if needle in self.log_path.read_text(errors="replace"):
                return
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise AssertionError(f"{self.role} exited {self.proc.returncode}: {self.tail()}")
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.role} never logged {needle!r}: {self.tail()}")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: no drain, no acks, no goodbye."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM, then wait for a graceful exit (SIGKILL after ``timeout_s``)."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode
