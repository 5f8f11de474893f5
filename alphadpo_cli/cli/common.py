"""What every command module shares: the stderr console and `friendly`, the error wrapper.

Expected mistakes (bad config, bad data, missing files, an unknown loss or model) print one clear
paragraph "error: ..." on stderr and exit with status 2; only real bugs show a traceback. The
mistakes are `config.UserError`s, click exceptions that click itself prints and exits on; `friendly`
does what click cannot: a stopped training run's own exit status, a full disk, Ctrl-C (130).
"""

from __future__ import annotations

import functools
import sys

import click

from ..console import console as _console

console = _console()  # messages, notices, progress: stderr
results = _console(stderr=False)  # what a command prints for the user: stdout

#: A stopped run (module, class name) is looked up, never imported: the trainer imports torch, and
#: an error raised before torch loads exits without loading it.
_TRAINING_STOPPED = ("train.trainer", "TrainingStopped")
_PACKAGE = __name__.rsplit(".", 2)[0]  # alphadpo_cli


def _loaded(*names: tuple[str, str]) -> tuple[type[BaseException], ...]:
    """The classes among `names` (module in the package, class name) whose modules are imported."""
    found = (getattr(sys.modules.get(f"{_PACKAGE}.{module}"), cls, None) for module, cls in names)
    return tuple(c for c in found if isinstance(c, type))


def friendly(fn):
    """Turn expected errors into a message and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..config import UserError

        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise  # UserError included: click prints "error: ..." and exits with its exit_code (2)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            sys.exit(130)
        except _loaded(_TRAINING_STOPPED) as exc:
            console.print(f"[yellow]{exc}[/]")
            sys.exit(exc.exit_code)
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                raise UserError(f"the disk is full while writing {exc.filename or ''}: "
                                "free some space; files already written were left as they were.") from None
            raise

    return wrapper
