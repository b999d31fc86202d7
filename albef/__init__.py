"""ALBEF ("Align before Fuse", Li et al., NeurIPS 2021): the shared model, data and engine code.

Importing the package has no side effects beyond arming a torchvision compatibility fix (see ``_compat``; it runs
when torchvision is first imported): no argument parsing, no registration, no network access, no torch import.

    import albef
    model, preprocess, tokenizer = albef.load("ALBEF_4M.pth", task="retrieval")   # see albef.pretrained

    from albef.models import build_model
    model = build_model("tiny", task="pretrain")
"""

from albef._compat import install as _install_torchvision_fix

_install_torchvision_fix()

__version__ = "0.1.0"


def load(name_or_path, task=None, device="cpu", dtype=None, model=None):
    """``(model, preprocess, tokenizer)`` from a checkpoint file, run directory, ``save_pretrained`` folder or hub
    id: ``albef.pretrained.load`` (imported on first call, so ``import albef`` stays free of torch)."""
    from albef.pretrained import load as _load

    return _load(name_or_path, task, device, dtype, model)


def save_pretrained(model, directory, **card):
    """A folder ``albef.load`` reads (weights, config, model card): ``albef.pretrained.save_pretrained``."""
    from albef.pretrained import save_pretrained as _save

    return _save(model, directory, **card)


def push_to_hub(model_or_folder, repo_id, **kwargs):
    """Upload a model (with its model card) or a ``save_pretrained`` folder to the HuggingFace hub:
    ``albef.pretrained.push_to_hub``."""
    from albef.pretrained import push_to_hub as _push

    return _push(model_or_folder, repo_id, **kwargs)
