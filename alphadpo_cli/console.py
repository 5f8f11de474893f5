"""The package's one console per stream and its one progress display.

Messages, notices and progress go to stderr (`console()`); results a command prints for the user
(tables, summaries) go to stdout (`console(stderr=False)`), so `alphadpo ... > out.txt` keeps
only results. Both consoles look up `sys.stdout`/`sys.stderr` when they write, so a test runner
that swaps the streams sees the output.

`Bars` is the one progress display: any number of bars, each advanced through the callable that
`bar()` returns; disabled (quiet, or not the main process) it draws nothing and costs nothing.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console

_CONSOLES: dict[bool, Console] = {}


def console(stderr: bool = True) -> Console:
    """The console on stderr (default: messages, progress) or on stdout (results)."""
    if stderr not in _CONSOLES:
        _CONSOLES[stderr] = Console(stderr=stderr)
    return _CONSOLES[stderr]


def notice(message: str) -> None:
    """A one-line notice on stderr ("notice: ..."), never highlighted or wrapped by rich."""
    console().print(f"[yellow]notice:[/] {message}", highlight=False, soft_wrap=True)


Advance = Callable[..., None]


class Bars:
    """One rich progress display holding any number of bars.

    `label` formats the description column (e.g. "[bold]{task.description}"), `fields` adds a text
    column of per-bar fields (e.g. "{task.fields[rate]}"), `eta_only` leaves out the elapsed time,
    `transient` clears the bars when done, `disable` draws nothing.
    """

    def __init__(self, out: Console | None = None, *, disable: bool = False, transient: bool = False,
                 label: str = "{task.description}", fields: str | None = None, eta_only: bool = False,
                 unit: str | None = None):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        columns = [TextColumn(label), BarColumn(), MofNCompleteColumn()]
        if unit:
            columns.append(TextColumn(unit))
        if fields:
            columns.append(TextColumn(fields))
        if not eta_only:
            columns.append(TimeElapsedColumn())
        columns.append(TimeRemainingColumn())
        self.disabled = disable
        self.progress = Progress(*columns, console=out or console(), transient=transient, disable=disable)

    def __enter__(self) -> "Bars":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def bar(self, description: str, total: int, **fields) -> Advance:
        """A new bar; the returned `advance(n=1, *, completed=None, **fields)` moves it by `n`, or
        to `completed`, and updates its fields."""
        task = self.progress.add_task(description, total=total, **fields)

        def advance(n: int = 1, *, completed: int | None = None, **new_fields) -> None:
            if completed is not None:
                self.progress.update(task, completed=completed, **new_fields)
            else:
                self.progress.update(task, advance=n, **new_fields)

        return advance

    def print(self, *args, **kwargs) -> None:
        """A line above the bars."""
        if not self.disabled:
            self.progress.console.print(*args, **kwargs)


@contextlib.contextmanager
def progress_bar(total: int, description: str, out: Console | None = None, *, disable: bool = False
                 ) -> Iterator[Advance]:
    """One bar as a context manager yielding `advance(n=1)`; nothing is drawn for an empty total."""
    if disable or total <= 0:
        yield lambda n=1, **_: None
        return
    with Bars(out) as bars:
        yield bars.bar(description, total)
