"""SIGINT/SIGTERM during training: the first finishes the step, saves a checkpoint and stops;
a second one stops at once, without a checkpoint."""

from __future__ import annotations

import signal

from rich.console import Console


class StopSignals:
    """While entered, SIGINT and SIGTERM set `received` instead of killing the process (the loop
    checks it after each step); a second signal raises KeyboardInterrupt. Exiting restores the
    previous handlers. Outside the main thread nothing is installed."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, console: Console):
        self.console = console
        self.received: int | None = None
        self._previous: dict = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name

    def _handler(self, signum, _frame) -> None:
        if self.received is not None:  # a second signal: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.received = signum
        self.console.print(f"[yellow]received {signal.Signals(signum).name}: finishing this step, saving a "
                           "checkpoint and stopping (send it again to stop at once)[/]")

    def __enter__(self) -> "StopSignals":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
