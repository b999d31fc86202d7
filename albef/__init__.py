"""ALBEF ("Align before Fuse", Li et al., NeurIPS 2021): the shared model, data and engine code.

Importing the package has no side effects beyond arming a torchvision compatibility fix (see ``_compat``; it runs
when torchvision is first imported): no argument parsing, no registration, no network access, no torch import.

    from albef.models import build_model
    model = build_model("tiny", task="pretrain")
"""
from albef._compat import install as _install_torchvision_fix

_install_torchvision_fix()

__version__ = "0.1.0"
