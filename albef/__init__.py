"""ALBEF ("Align before Fuse", Li et al., NeurIPS 2021): the shared model, data and engine code.

Importing the package has no side effects beyond a torchvision compatibility fix (see ``_compat``):
no argument parsing, no registration, no network access.

    from albef.models import build_model
    model = build_model("tiny", task="pretrain")
"""
from albef._compat import fix_torchvision as _fix_torchvision

_fix_torchvision()

__version__ = "0.1.0"
