"""SIGTERM and SIGINT as a stop request that the main thread waits for (serve and proxy drain, then exit 0)."""

from __future__ import annotations

import signal
import threading


class StopSignals:
    """Installs handlers for SIGTERM and SIGINT; `wait()` blocks until one arrives and names it."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._received: list[str] = []
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, number: int, _frame: object) -> None:
        self._received.append(signal.Signals(number).name)
        self._stop.set()

    def wait(self) -> str:
        """The name of the first signal received."""
        self._stop.wait()
        return self._received[0] if self._received else "stop"
