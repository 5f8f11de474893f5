"""The mistakes a user can fix, as click exceptions: `alphadpo` prints one paragraph
"error: ..." on stderr and exits with status 2, never a traceback (click does it, for any command;
`cli/common.friendly` is left with what click cannot do)."""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """A mistake the user can fix (a setting, a data file, a model source, a method's name)."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(str(message))

    def show(self, file=None) -> None:
        click.echo(f"{click.style('error:', fg='red', bold=True)} {self.format_message()}", file=file,
                   err=file is None, color=self.show_color)


class ConfigError(UserError, ValueError):
    """A configuration mistake the user can fix; printed without a traceback."""
