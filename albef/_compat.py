"""Import-time compatibility fixes, applied before timm/transformers are imported.

The only fix: on CPU machines where pip paired the CPU torch wheel with a CUDA torchvision wheel,
``import torchvision`` raises ``RuntimeError: operator torchvision::nms does not exist``. timm imports
torchvision at module level (and transformers does when it is installed), so the whole stack would be
unusable. We try the real import first; only on that exact failure we register the two operator schemas
torchvision's Python code expects and import again. ``torchvision.transforms`` then works; only
``torchvision.ops.nms`` cannot be called (we never call it). Where torchvision imports natively this does
nothing.
"""
from __future__ import annotations

import sys

_LIB = None  # keeps the torch.library registration alive for the life of the process


def fix_torchvision() -> None:
    global _LIB
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return  # torchvision not installed: nothing to fix, timm falls back where it can
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torch

    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811
