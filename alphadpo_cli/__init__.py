"""alphadpo: α-DPO preference optimisation you can trust.

The CLI (`alphadpo`) is a thin shell over this API:

    from alphadpo_cli import resolve_config, train
    result = train(resolve_config(preset="demo"))
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import alphadpo_cli.losses` does not pull in transformers.
    if name == "train":
        from .train.trainer import train

        return train
    if name == "resolve_config":
        from .config import resolve_config

        return resolve_config
    if name == "evaluate":
        from .evaluation import evaluate

        return evaluate
    raise AttributeError(name)


__all__ = ["train", "resolve_config", "evaluate", "__version__"]
