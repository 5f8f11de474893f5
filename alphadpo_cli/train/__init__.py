"""Training: `train(config)` (in `trainer.py`; the other modules are its parts, one concern each).

`alphadpo_cli.train` is this package, and calling it trains: `from alphadpo_cli import train` finds
the package (Python binds a subpackage to its parent's attribute of the same name, hiding the
function), so the package forwards a call to `trainer.train`. `Trainer`, `TrainResult`,
`TrainingStopped` and `Plan` are importable from here too. Nothing heavy is imported until one of
them is used (`alphadpo_cli.train.launch` stays light for the CLI).
"""

from __future__ import annotations

import sys
import types

_EXPORTS = ("train", "Trainer", "TrainResult", "TrainingStopped", "Plan")


class _TrainPackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from .trainer import train  # here, not at the top: torch and accelerate load only to train

        return train(*args, **kwargs)


def __getattr__(name: str):
    if name in _EXPORTS:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


sys.modules[__name__].__class__ = _TrainPackage
__all__ = list(_EXPORTS)
