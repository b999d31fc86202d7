"""The official ALBEF annotation files as a map-style dataset, so official data files work unchanged.

The pretraining JSON (``dataset/caption_dataset.py`` ``pretrain_dataset``) is a list of
``{"image": path, "caption": str | [str, ...]}``; a list caption gives one caption drawn at random per access.
Paths are used as written (the official code has no image root); ``image_root`` is joined to relative paths.
Several files are concatenated in order, as the official ``train_file`` list.

    ds = JsonCaptionDataset(["data/coco.json", "data/vg.json"], pretrain_transform(256))
    ds.set_epoch(epoch)
    sample = ds[i]        # {"image": uint8 HxWx3 RGB, "caption": str, "key": path}; albef.data.collate batches it

``build_pretrain_loader`` reads these files with the same epoch, rank split and resume semantics as shards when
``data.json_files`` is set. Standalone, ``ds[i]`` draws its augmentation from ``(seed, epoch, i)`` and raises
``BadSample`` (naming the file) for an unreadable image.
"""

from __future__ import annotations

import os
import random
from typing import Dict, List, Sequence, Tuple

from torch.utils.data import Dataset

from albef.data.samples import BadSample, derive_seed, make_sample
from albef.data.transforms import ImageTransform
from albef.fsutil import read_json


def read_json_list(path: str, keys: Sequence[str] = ()) -> list:
    """An official annotation file: a JSON list of objects with ``keys``; errors name the file, entry and field."""
    data = read_json(path, "annotation file")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list, got {type(data).__name__}")
    for i, entry in enumerate(data):
        missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(f"{path}[{i}]: missing field(s) {missing}")
    return data


def load_json_entries(json_files: Sequence[str], image_root: str = "") -> List[Tuple[str, Tuple[str, ...]]]:
    """``[(image path, captions), ...]`` from official JSON files; malformed entries are errors naming them."""
    entries = []
    for path in json_files:
        data = read_json_list(path)
        for i, entry in enumerate(data):
            image = entry.get("image") if isinstance(entry, dict) else None
            caption = entry.get("caption") if isinstance(entry, dict) else None
            if not isinstance(image, str) or not image:
                raise ValueError(f"{path}[{i}]: 'image' must be a non-empty path string, got {image!r}")
            if isinstance(caption, str):
                captions = (caption,)
            elif isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
                captions = tuple(caption)
            else:
                raise ValueError(
                    f"{path}[{i}]: 'caption' must be a string or a non-empty list of strings, got {caption!r}"
                )
            if image_root and not os.path.isabs(image):
                image = os.path.join(image_root, image)
            entries.append((image, captions))
    return entries


class JsonCaptionDataset(Dataset):
    def __init__(
        self,
        json_files: Sequence[str],
        transform: ImageTransform,
        max_words: int = 30,
        image_root: str = "",
        seed: int = 0,
    ):
        if not json_files:
            raise ValueError("JsonCaptionDataset needs at least one JSON file")
        self.json_files = list(json_files)
        self.entries = load_json_entries(json_files, image_root)
        self.transform = transform
        self.max_words = max_words
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, index: int, rng: random.Random) -> Dict:
        """Entry ``index`` with the given randomness; raises ``BadSample``."""
        path, captions = self.entries[index]
        try:
            with open(path, "rb") as f:
                image = f.read()
        except OSError as e:
            raise BadSample("missing_image", f"{path}: {e.strerror or e}") from None
        return make_sample(image, captions, path, self.transform, rng, self.max_words)

    def __getitem__(self, index: int) -> Dict:
        try:
            return self.load(index, random.Random(derive_seed(self.seed, self.epoch, index)))
        except BadSample as e:
            raise BadSample(e.reason, f"{self.entries[index][0]}: {e.detail}") from None
