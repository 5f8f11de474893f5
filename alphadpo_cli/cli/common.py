"""What every command module shares: the stderr console and `friendly`, the error wrapper.

Expected mistakes (bad config, bad data, missing files, an unknown loss or model) print one clear
paragraph and exit with status 2; only real bugs show a traceback. The errors are matched by type.
"""

from __future__ import annotations

import functools
import sys

from rich.console import Console

console = Console(stderr=True)


def _expected_errors() -> tuple[type[BaseException], ...]:
    # imported when a command runs, not when `alphadpo --help` does (losses imports torch)
    from ..config import ConfigError
    from ..data import DataError
    from ..losses import UnknownLossError
    from ..models.sources import SourceError

    return (ConfigError, DataError, UnknownLossError, SourceError)


def friendly(fn):
    """Turn expected errors into a message and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..train.trainer import TrainingStopped

        try:
            return fn(*args, **kwargs)
        except TrainingStopped as exc:
            console.print(f"[yellow]{exc}[/]")
            sys.exit(exc.exit_code)
        except _expected_errors() as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                console.print(f"[bold red]error:[/] the disk is full while writing {exc.filename or ''}: "
                              "free some space; files already written were left as they were.")
                sys.exit(2)
            raise
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            sys.exit(130)

    return wrapper
