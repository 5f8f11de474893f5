"""alphadpo: α-DPO preference optimisation you can trust.

The CLI (`alphadpo`) is a thin shell over this API:

    from alphadpo_cli import resolve_config, train
    result = train(resolve_config(preset="demo"))
"""

import importlib

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import alphadpo_cli.losses` does not pull in transformers.
    if name == "train":
        # the subpackage, which trains when called (alphadpo_cli/train/__init__.py): once any
        # alphadpo_cli.train module is imported, Python binds this name to the subpackage anyway
        return importlib.import_module(".train", __name__)
    if name == "resolve_config":
        from .config import resolve_config

        return resolve_config
    if name == "evaluate":
        from .evaluation import evaluate

        return evaluate
    raise AttributeError(name)


__all__ = ["train", "resolve_config", "evaluate", "__version__"]
