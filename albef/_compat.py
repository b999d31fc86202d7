"""Import-time compatibility fixes, applied before timm/transformers are imported.

The only fix: on CPU machines where pip paired the CPU torch wheel with a CUDA torchvision wheel,
``import torchvision`` raises ``RuntimeError: operator torchvision::nms does not exist``. timm imports
torchvision at module level (and transformers does when it is installed), so the whole stack would be
unusable. We try the real import first; only on that exact failure we register the two operator schemas
torchvision's Python code expects and import again. ``torchvision.transforms`` then works; only
``torchvision.ops.nms`` cannot be called (we never call it). Where torchvision imports natively this does
nothing.

``install()`` (run by ``import albef``) applies the fix lazily: a finder at the front of ``sys.meta_path`` runs it
the first time anything imports torchvision, so importing ``albef`` for its light modules (``albef.fsutil``, which
``data_prep`` uses) does not import torch: that cost data_prep 2.8 s per process.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
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


class _FixOnFirstImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs ``fix_torchvision`` when torchvision is first imported, then hands back the module it imported."""

    def __init__(self):
        self._spec = None

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        uninstall()
        fix_torchvision()  # imports torchvision, natively or with the fix (this finder is out of the way)
        module = sys.modules.get("torchvision")
        if module is None:
            return None  # not installed: the next finders report it as usual
        self._spec = module.__spec__
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        return sys.modules["torchvision"]

    def exec_module(self, module) -> None:
        module.__spec__ = self._spec  # the import system set ours; keep torchvision's own


_FINDER = _FixOnFirstImport()


def install() -> None:
    if "torchvision" not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
