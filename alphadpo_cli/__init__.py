"""alphadpo: α-DPO preference optimisation you can trust.

The CLI (`alphadpo`) is a thin shell over this API.
"""

__version__ = "0.1.0"
