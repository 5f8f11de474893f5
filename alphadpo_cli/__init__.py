"""alphadpo: α-DPO preference optimisation you can trust.

The CLI (`alphadpo`) is a thin shell over this API:

    from alphadpo_cli import resolve_config, train
    result = train(resolve_config(preset="demo"))
"""

import importlib
import os

__version__ = "0.1.0"

# Intel MKL's fp32 GEMMs on CPUs without AVX-512 round differently with the alignment of their
# inputs, so a run resumed from a checkpoint drifted from the uninterrupted one in the 5th digit
# (tests/test_iterate_rounds.py, with MKL_ENABLE_INSTRUCTIONS=AVX2). Conditional Numerical
# Reproducibility in its strict mode keeps MKL's fastest code path for the CPU and makes the
# results independent of alignment (no measurable cost on 2 cores). Read when MKL first runs, so
# it is set here, before anything imports torch; a value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


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
