"""`alphadpo`: a thin click shell over the Python API.

One module per command group, each registered below:

* `train`: `cli/train.py`;
* `presets list | show`, `losses`: `cli/presets.py`;
* `eval alpacaeval | arena-hard | preference`: `cli/eval.py`;
* `margins`: `cli/margins.py`;
* `data build`: `cli/data.py`;
* `iterate`: `cli/iterate.py` (online α-DPO rounds);
* `compare`: `cli/compare.py` (methods × grid × seeds).

They share `console` and `friendly` (`cli/common.py`). Expected mistakes print one clear
paragraph "error: ..." and exit with status 2, only real bugs show a traceback: they are
`config.UserError`s (`ConfigError` among them), click exceptions that click prints and exits on;
`friendly` adds what click cannot do (a stopped run's exit status, a full disk, Ctrl-C). Each module imports only
click at its top and the rest inside the command bodies, so `alphadpo --help` stays instant (no
torch). The entry point is `alphadpo_cli.cli:main`; `python -m alphadpo_cli.cli` runs it too.
"""

from __future__ import annotations

import os

import click

from .. import __version__
from . import compare as compare_commands
from . import data as data_commands
from . import eval as eval_commands
from . import iterate as iterate_commands
from . import margins as margins_commands
from . import presets as preset_commands
from . import train as train_commands
from .common import console, friendly

__all__ = ["console", "friendly", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="alphadpo")
def main():
    """α-DPO preference optimisation: train, evaluate, and inspect the adaptive margin."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


main.add_command(train_commands.train)
main.add_command(preset_commands.presets)
main.add_command(preset_commands.losses)
eval_commands.register(main)
data_commands.register(main)
margins_commands.register(main)
iterate_commands.register(main)
compare_commands.register(main)
