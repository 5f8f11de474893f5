"""`python -m alphadpo_cli.cli`: the `alphadpo` command (what launched processes run)."""

from . import main

main()
