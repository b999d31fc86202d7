"""Loader throughput: ``albef.data`` (shards) vs a plain re-implementation of the official ALBEF image path.

The official path (``dataset/caption_dataset.py`` ``pretrain_dataset`` + ``dataset/__init__.py``): a JSON list of
image files, ``Image.open(path).convert('RGB')``, torchvision ``RandomResizedCrop(256, scale=(0.2, 1.0), bicubic)``
+ ``RandomHorizontalFlip`` + ALBEF's OpenCV ``RandomAugment(2, 7, isPIL=True)`` (re-implemented below with the
official structure: numpy round trip, per-channel split/merge, fancy-index lookup tables) + ``ToTensor`` +
``Normalize``, ``DataLoader(batch_size, num_workers, drop_last=True)`` with its default collate, captions
tokenised in the main process as ``Pretrain.py`` does (with our fast tokenizer; the official one is pure Python).
Ours: the same JPEGs written to shards with ``data_prep.shards``, read by ``build_pretrain_loader`` (tokenising in
its workers, shipping uint8 pixels), normalised in the main process with ``normalize_images`` as the engine does on
its device (here the CPU: the cost is counted). Both sides end with the same batch: normalised float32 images
(B, 3, res, res), input_ids, attention_mask.

Each measurement runs in a fresh process, sides alternating; the first batches (worker start, buffer fill) are
excluded. Prints samples/s of each side, per worker, the ratio of the medians and of each round (PERFORMANCE.md:
goal >= 2x).

    .venv/bin/python bench/loader.py                      # 640x480 JPEGs, batch 16, 2 workers, 3 rounds
    .venv/bin/python bench/loader.py --size 1600x1200     # large originals: draft (DCT-scaled) decoding matters
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFile  # noqa: E402

import albef  # noqa: E402,F401  (torchvision compatibility fix before torchvision is imported)

AUGS = [
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
]


# ---- the official path, re-implemented -------------------------------------------------------------------------
class OfficialRandomAugment:
    """ALBEF ``RandomAugment(N, M, isPIL=True, augs)``: np.random op draws, OpenCV/numpy ops on the RGB array."""

    def __init__(self, n: int = 2, m: int = 7):
        self.n, self.m = n, m
        self.fill = (128, 128, 128)

    @staticmethod
    def _per_channel(img, tune):
        return cv2.merge([tune(ch) for ch in cv2.split(img)])

    @staticmethod
    def _autocontrast(ch):
        high, low = ch.max(), ch.min()
        if high <= low:
            return ch
        scale = 255.0 / (high - low)
        table = np.arange(256) * scale - low * scale
        table = table.clip(0, 255).astype(np.uint8)
        return table[ch]

    @staticmethod
    def _equalize(ch):
        hist = cv2.calcHist([ch], [0], None, [256], [0, 256])
        nonzero = hist[hist != 0].reshape(-1)
        step = np.sum(nonzero[:-1]) // 255
        if step == 0:
            return ch
        shifted = np.empty_like(hist)
        shifted[0] = step // 2
        shifted[1:] = hist[:-1]
        table = (np.cumsum(shifted) // step).clip(0, 255).astype(np.uint8)
        return table[ch]

    def _warp(self, img, matrix):
        h, w = img.shape[:2]
        return cv2.warpAffine(img, matrix, (w, h), borderValue=self.fill, flags=cv2.INTER_LINEAR).astype(np.uint8)

    def _apply(self, name, img):
        level = self.m / 10
        sign = -1.0 if np.random.random() > 0.5 else 1.0
        if name == "Identity":
            return img
        if name == "AutoContrast":
            return self._per_channel(img, self._autocontrast)
        if name == "Equalize":
            return self._per_channel(img, self._equalize)
        if name == "Brightness":
            table = (np.arange(256, dtype=np.float32) * (level * 1.8 + 0.1)).clip(0, 255).astype(np.uint8)
            return table[img]
        if name == "Sharpness":
            kernel = np.ones((3, 3), dtype=np.float32)
            kernel[1][1] = 5
            kernel /= 13
            smooth = cv2.filter2D(img, -1, kernel)
            out = img.astype(np.float32)
            smooth = smooth.astype(np.float32)[1:-1, 1:-1, :]
            out[1:-1, 1:-1, :] = smooth + (level * 1.8 + 0.1) * (out[1:-1, 1:-1, :] - smooth)
            return out.astype(np.uint8)
        if name == "ShearX":
            return self._warp(img, np.float32([[1, sign * level * 0.3, 0], [0, 1, 0]]))
        if name == "ShearY":
            return self._warp(img, np.float32([[1, 0, 0], [sign * level * 0.3, 1, 0]]))
        if name == "TranslateX":
            return self._warp(img, np.float32([[1, 0, -sign * level * 10], [0, 1, 0]]))
        if name == "TranslateY":
            return self._warp(img, np.float32([[1, 0, 0], [0, 1, -sign * level * 10]]))
        h, w = img.shape[:2]
        return cv2.warpAffine(
            img, cv2.getRotationMatrix2D((w / 2, h / 2), sign * level * 30, 1), (w, h), borderValue=self.fill
        )

    def __call__(self, img):
        img = np.array(img)
        for name in np.random.choice(AUGS, self.n):
            if np.random.random() > 0.5:
                continue
            img = self._apply(name, img)
        return img


class OfficialPretrainDataset(torch.utils.data.Dataset):
    def __init__(self, ann_file: str, transform, max_words: int = 30):
        from albef.tokenizer import pre_caption

        self.ann = json.load(open(ann_file))
        self.transform, self.max_words, self.pre_caption = transform, max_words, pre_caption

    def __len__(self):
        return len(self.ann)

    def __getitem__(self, index):
        ann = self.ann[index]
        caption = random.choice(ann["caption"]) if isinstance(ann["caption"], list) else ann["caption"]
        image = Image.open(ann["image"]).convert("RGB")
        return self.transform(image), self.pre_caption(caption, self.max_words)


def official_loader(data_dir: Path, batch_size: int, workers: int, res: int):
    from torchvision import transforms

    ImageFile.LOAD_TRUNCATED_IMAGES = True
    normalize = transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(res, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            OfficialRandomAugment(2, 7),
            transforms.ToTensor(),
            normalize,
        ]
    )
    dataset = OfficialPretrainDataset(str(data_dir / "pretrain.json"), transform)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, pin_memory=False, sampler=sampler, drop_last=True
    )


def our_loader(data_dir: Path, batch_size: int, workers: int, res: int):
    from albef.data import DataConfig, build_pretrain_loader
    from albef.tokenizer import Tokenizer

    cfg = DataConfig(
        shards=[str(data_dir / "shards")], image_res=res, batch_size=batch_size, num_workers=workers, pin_memory=False
    )
    return build_pretrain_loader(cfg, Tokenizer(), rank=0, world_size=1, seed=0)


# ---- data --------------------------------------------------------------------------------------------------------
def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields, hard-edged shapes and sensor-like noise: compresses like a photo (not like noise)."""
    base = (rng.random((6 + rng.integers(0, 10), 8 + rng.integers(0, 12), 3)) * 255).astype(np.uint8)
    img = Image.fromarray(base).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, width // 3)), y0 + int(rng.integers(10, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 5, (height, width, 3)).astype(np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def make_data(data_dir: Path, num_images: int, width: int, height: int, per_shard: int) -> float:
    from data_prep.shards import ShardWriter, write_manifest

    rng = np.random.default_rng(0)
    (data_dir / "images").mkdir(parents=True)
    ann = []
    writer = None
    total_bytes = 0
    for i in range(num_images):
        buf = io.BytesIO()
        photo_like(rng, width, height).save(buf, "JPEG", quality=90)
        jpg = buf.getvalue()
        total_bytes += len(jpg)
        path = data_dir / "images" / f"{i:06d}.jpg"
        path.write_bytes(jpg)
        captions = [f"a photo number {i} of some things", f"picture {i}: objects on a background"]
        ann.append({"image": str(path), "caption": captions})
        if i % per_shard == 0:
            if writer is not None:
                writer.commit()
            writer = ShardWriter(data_dir / "shards", i // per_shard)
        writer.write(f"{i:06d}", jpg, captions, {"path": str(path)})
    writer.commit()
    write_manifest(data_dir / "shards")
    (data_dir / "pretrain.json").write_text(json.dumps(ann))
    return total_bytes / num_images


# ---- measurement ---------------------------------------------------------------------------------------------------
def measure(side: str, data_dir: Path, batch_size: int, workers: int, res: int, warmup: int) -> dict:
    from albef.data import normalize_images
    from albef.tokenizer import Tokenizer

    loader = (official_loader if side == "official" else our_loader)(data_dir, batch_size, workers, res)
    tokenizer = Tokenizer()
    count, t0 = 0, None
    for i, batch in enumerate(loader):
        if side == "official":  # Pretrain.py tokenises in the training loop (here with our fast tokenizer)
            images, text = batch[0], tokenizer(list(batch[1]), max_length=25)
            assert text["input_ids"].shape[0] == batch_size
        else:  # the engine's to_device: uint8 pixels normalised where the model runs (a GPU in training)
            images = normalize_images(batch["image"])
        assert images.shape == (batch_size, 3, res, res) and images.dtype == torch.float32
        if i + 1 == warmup:
            t0 = time.perf_counter()
        elif i + 1 > warmup:
            count += images.shape[0]
    elapsed = time.perf_counter() - t0
    return {"side": side, "samples": count, "seconds": elapsed, "samples_per_s": count / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="640x480", help="JPEG size WxH")
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="batches excluded from the timing")
    parser.add_argument("--side", choices=["official", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(measure(args.side, args.data, args.batch_size, args.workers, args.res, args.warmup)))
        return
    width, height = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="albef_loader_bench_") as tmp:
        data_dir = Path(tmp)
        mean_bytes = make_data(data_dir, args.images, width, height, args.per_shard)
        print(
            f"{args.images} JPEGs {width}x{height} (q90, mean {mean_bytes / 1024:.0f} KiB), res {args.res}, "
            f"batch {args.batch_size}, {args.workers} workers, {args.rounds} rounds per side, torch "
            f"{torch.__version__}, {os.cpu_count()} CPUs"
        )
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        results = {"official": [], "ours": []}
        for r in range(args.rounds):
            for side in ("official", "ours"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--side",
                    side,
                    "--data",
                    str(data_dir),
                    "--batch-size",
                    str(args.batch_size),
                    "--workers",
                    str(args.workers),
                    "--res",
                    str(args.res),
                    "--warmup",
                    str(args.warmup),
                ]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"{side} run failed:\n{out.stderr}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results[side].append(res["samples_per_s"])
                print(
                    f"  round {r + 1} {side:8s}: {res['samples_per_s']:7.1f} samples/s "
                    f"({res['samples']} samples in {res['seconds']:.2f}s)",
                    flush=True,
                )
        med = {side: statistics.median(v) for side, v in results.items()}
        for side in ("official", "ours"):
            print(f"{side:8s}: {med[side]:7.1f} samples/s, {med[side] / args.workers:6.1f} per worker (median)")
        # each round's two runs are back to back, so their ratio is robust to this machine's speed drifting
        rounds = [o / f for o, f in zip(results["ours"], results["official"])]
        print(
            f"ratio ours/official: {med['ours'] / med['official']:.2f}x of the medians, per round "
            f"{', '.join(f'{r:.2f}' for r in rounds)} (median {statistics.median(rounds):.2f}x; goal >= 2x)"
        )


if __name__ == "__main__":
    main()
