"""ALBEF image transforms (albef/data/transforms.py): official op list, magnitudes and semantics, decoding,
crop/resize equivalence with PIL/torchvision, normalisation. Real JPEG/PNG bytes made with Pillow throughout."""

from __future__ import annotations

import collections
import io
import random

import albef  # noqa: F401  (the torchvision compatibility fix, before torchvision is imported)

# isort: split
import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms as tv
from torchvision.transforms import functional as tvf

from albef.data import (
    CLIP_MEAN,
    CLIP_STD,
    RANDAUG_OPS,
    ImageTransform,
    RandAugment,
    finetune_transform,
    normalize_images,
    pretrain_transform,
    random_resized_crop_params,
    stack_images,
    test_transform,
)
from albef.data.transforms import (
    CROP_RATIO,
    _draft_factor,
    _normalize_torch,
    crop_decoder_available,
    decode_bgr,
    decode_jpeg_crop,
    read_image_header,
    resize_bicubic,
    to_device,
)

OFFICIAL_OPS = [
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


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth colour field with edges and mild noise (RGB uint8), like a photo rather than white noise."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    arr = np.asarray(base).astype(np.int16)
    arr[height // 3 : height // 2, width // 4 : width // 2] = 230
    arr += rng.integers(-6, 7, arr.shape).astype(np.int16)
    return arr.clip(0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def test_normalisation_constants_and_normalize_images_equal_totensor_normalize():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    imgs = [photo(40, 30, s)[:30, :30] for s in range(4)]
    pixels = stack_images(imgs)  # what the loaders ship: uint8 (B, H, W, 3)
    assert pixels.shape == (4, 30, 30, 3) and pixels.dtype == torch.uint8 and np.array_equal(pixels[2], imgs[2])
    ref = torch.stack([tv.Normalize(CLIP_MEAN, CLIP_STD)(tv.ToTensor()(im)) for im in imgs])
    for normalize in (normalize_images, lambda x: _normalize_torch(x, torch.float32)):  # CPU path, device path
        ours = normalize(pixels)
        assert ours.shape == (4, 3, 30, 30) and ours.dtype == torch.float32 and ours.is_contiguous()
        assert torch.allclose(ours, ref, atol=1e-5)
        pairs = normalize(pixels.view(2, 2, 30, 30, 3))  # leading dimensions (NLVR2/VE image pairs)
        assert pairs.shape == (2, 2, 3, 30, 30) and torch.allclose(pairs.view(4, 3, 30, 30), ref, atol=1e-5)
    # the engine's batch move: uint8 = pixels (normalised), other floats take the dtype, integers and the rest as is
    cpu = torch.device("cpu")
    assert torch.equal(to_device(pixels, cpu, torch.float32), normalize_images(pixels))
    assert to_device(torch.ones(2, dtype=torch.float64), cpu, torch.bfloat16).dtype == torch.bfloat16
    assert to_device(torch.ones(2, dtype=torch.int64), cpu, torch.bfloat16).dtype == torch.int64
    assert to_device(["a caption"], cpu, torch.float32) == ["a caption"]
    half = normalize_images(pixels, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), ref, atol=2e-2)
    lo = (0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    hi = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    extremes = normalize_images(stack_images([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)]))
    assert torch.allclose(extremes[0, :, 0, 0], lo, atol=1e-6) and torch.allclose(extremes[1, :, 0, 0], hi, atol=1e-6)
    with pytest.raises(ValueError, match="image 1: expected a 30x30x3 uint8"):
        stack_images([imgs[0], imgs[1][:20]])
    with pytest.raises(ValueError, match=r"expected uint8 pixels \(..., H, W, 3\)"):
        normalize_images(ref)


def test_randaugment_op_list_and_magnitudes_are_official():
    assert list(RANDAUG_OPS) == OFFICIAL_OPS
    ra = RandAugment()  # ALBEF: RandomAugment(2, 7, isPIL=True, augs=[...])
    assert ra.num_ops == 2 and list(ra.ops) == OFFICIAL_OPS
    expected = {
        "Brightness": 1.36,
        "Sharpness": 1.36,
        "ShearX": 0.21,
        "ShearY": 0.21,
        "TranslateX": 7.0,
        "TranslateY": 7.0,
        "Rotate": 21.0,
    }
    assert ra.magnitudes.keys() == expected.keys()
    for name, value in expected.items():
        assert ra.magnitudes[name] == pytest.approx(value), name
    with pytest.raises(ValueError, match="Solarize"):
        RandAugment(ops=["Solarize"])


def test_randaugment_draws_two_ops_with_replacement_each_with_probability_half():
    ra = RandAugment()
    rng = random.Random(0)
    applied = collections.Counter()
    per_call = collections.Counter()
    signs = collections.Counter()
    repeats = 0
    n = 20000
    for _ in range(n):
        ops = ra.draw(rng)
        per_call[len(ops)] += 1
        applied.update(name for name, _ in ops)
        signs.update(sign for _, sign in ops)
        repeats += len(ops) == 2 and ops[0][0] == ops[1][0]
    # number applied ~ Binomial(2, 0.5): 1/4, 1/2, 1/4
    assert per_call[0] / n == pytest.approx(0.25, abs=0.015) and per_call[2] / n == pytest.approx(0.25, abs=0.015)
    for name in OFFICIAL_OPS:  # uniform over the 10 ops: n * 2 * 0.5 / 10 each
        assert applied[name] / n == pytest.approx(0.1, abs=0.01), name
    assert repeats / n == pytest.approx(0.25 / 10, abs=0.006)  # the same op twice: sampling with replacement
    assert signs[1.0] / sum(signs.values()) == pytest.approx(0.5, abs=0.015)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_geometric_ops_are_the_official_opencv_warps(sign):
    img = cv2.cvtColor(photo(72, 56), cv2.COLOR_RGB2BGR)
    ra = RandAugment()
    h, w = img.shape[:2]

    def warp(matrix):
        # the official calls, matrix dtype included: shears and translations build np.float32 matrices, Rotate passes
        # getRotationMatrix2D's float64 one (OpenCV 5 rounds the two differently, so the dtype is part of the op)
        return cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderValue=(128, 128, 128))

    def f32(rows):
        return np.float32(rows)

    assert np.array_equal(ra.apply("ShearX", img, sign), warp(f32([[1, sign * 0.21, 0], [0, 1, 0]])))
    assert np.array_equal(ra.apply("ShearY", img, sign), warp(f32([[1, 0, 0], [sign * 0.21, 1, 0]])))
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), sign * 21, 1)
    assert rot.dtype == np.float64
    assert np.array_equal(ra.apply("Rotate", img, sign), warp(rot))
    # translation by exactly 7 pixels, the rest filled with 128 (independent of OpenCV)
    tx = ra.apply("TranslateX", img, sign)
    ty = ra.apply("TranslateY", img, sign)
    if sign > 0:
        assert np.array_equal(tx[:, : w - 7], img[:, 7:]) and (tx[:, w - 7 :] == 128).all()
        assert np.array_equal(ty[: h - 7], img[7:]) and (ty[h - 7 :] == 128).all()
    else:
        assert np.array_equal(tx[:, 7:], img[:, : w - 7]) and (tx[:, :7] == 128).all()
        assert np.array_equal(ty[7:], img[: h - 7]) and (ty[:7] == 128).all()
    assert ra.apply("Identity", img) is img
    # whole-pixel translations take a copy path: the same pixels as OpenCV's warp, at any magnitude
    for magnitude in (7, 3, 0, 10):
        ra = RandAugment(magnitude=magnitude)
        m = sign * magnitude
        assert np.array_equal(ra.apply("TranslateX", img, sign), warp(f32([[1, 0, -m], [0, 1, 0]])))
        assert np.array_equal(ra.apply("TranslateY", img, sign), warp(f32([[1, 0, 0], [0, 1, -m]])))
    ra = RandAugment(magnitude=7, max_level=4)  # a fractional shift (17.5 px) still warps
    assert np.array_equal(ra.apply("TranslateX", img, sign), warp(f32([[1, 0, -sign * 17.5], [0, 1, 0]])))


def test_enhance_ops_match_pil_definitions():
    arr = photo(64, 48, seed=3)
    arr[:, :, 2] = arr[:, :, 2] // 2 + 40  # a channel with a narrow range, so autocontrast/equalize matter
    pil = Image.fromarray(arr)
    ra = RandAugment()
    assert np.array_equal(ra.apply("Equalize", arr), np.asarray(ImageOps.equalize(pil)))
    assert np.array_equal(ra.apply("AutoContrast", arr), np.asarray(ImageOps.autocontrast(pil)))
    flat = np.full((8, 8, 3), 99, np.uint8)
    assert np.array_equal(ra.apply("AutoContrast", flat), flat) and np.array_equal(ra.apply("Equalize", flat), flat)
    # Brightness: the official table (x * 1.36) truncated and clipped
    assert np.array_equal(ra.apply("Brightness", arr), np.minimum(np.floor(arr * np.float32(1.36)), 255))
    # Sharpness: PIL's SMOOTH kernel blended by 1.36, border pixels unchanged; official truncation vs PIL's
    # rounding differs by at most 1
    sharp = ra.apply("Sharpness", arr)
    ref = np.asarray(ImageEnhance.Sharpness(pil).enhance(1.36)).astype(int)
    assert np.abs(sharp.astype(int) - ref).max() <= 1
    assert np.array_equal(sharp[0], arr[0]) and np.array_equal(sharp[:, -1], arr[:, -1])
    # values beyond 255 or below 0 at edges are clipped (the official uint8 cast wraps them around)
    edge = np.zeros((5, 5, 3), np.uint8)
    edge[2, 2] = 255
    assert ra.apply("Sharpness", edge)[2, 2, 0] == 255


def test_random_resized_crop_params_distribution_and_fallback():
    rng = random.Random(0)
    areas, ratios = [], []
    for _ in range(3000):
        top, left, h, w = random_resized_crop_params(480, 640, (0.2, 1.0), CROP_RATIO, rng)
        assert 0 <= top and top + h <= 480 and 0 <= left and left + w <= 640
        areas.append(h * w / (480 * 640))
        ratios.append(w / h)
    assert min(areas) >= 0.2 - 0.01 and max(areas) <= 1.0
    assert min(ratios) >= 0.75 - 0.02 and max(ratios) <= 4 / 3 + 0.02
    # the same distribution as torchvision's get_params (draws that do not fit are rejected and redrawn)
    torch.manual_seed(0)
    ref = [tv.RandomResizedCrop.get_params(torch.empty(3, 480, 640), [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)]
    ref_areas = [h * w / (480 * 640) for _, _, h, w in ref]
    assert np.mean(areas) == pytest.approx(np.mean(ref_areas), abs=0.015)
    assert np.quantile(areas, 0.9) == pytest.approx(np.quantile(ref_areas, 0.9), abs=0.03)
    # all 10 attempts fail on very long images: torchvision's fallback, the centred crop with the ratio clamped
    for height, width, expected in ((10, 1000, (0, 493, 10, 13)), (1000, 10, (493, 0, 13, 10))):
        assert random_resized_crop_params(height, width, (0.2, 1.0), CROP_RATIO, random.Random(1)) == expected
        assert (
            tuple(tv.RandomResizedCrop.get_params(torch.empty(3, height, width), [0.2, 1.0], [3 / 4, 4 / 3]))
            == expected
        )


@pytest.mark.parametrize("box,size", [((13, 7, 301, 233), 96), ((40, 30, 90, 70), 96), ((0, 0, 320, 240), 320)])
def test_bicubic_resize_matches_pil_within_one_level(box, size):
    arr = photo(320, 240, seed=5)
    ours = resize_bicubic(arr[box[1] : box[3], box[0] : box[2]], size, size)
    ref = np.asarray(Image.fromarray(arr).crop(box).resize((size, size), Image.BICUBIC))
    diff = np.abs(ours.astype(int) - ref)
    assert ours.shape == (size, size, 3) and ours.flags.c_contiguous
    assert diff.max() <= 1 and diff.mean() < 0.05


def test_decoding_is_pixel_identical_to_pillow():
    arr = photo(120, 90, seed=7)
    cases = [
        encode(arr, quality=90),
        encode(arr, quality=95, subsampling=0),
        encode(np.asarray(Image.fromarray(arr).convert("L")), quality=90),
        encode(arr, "PNG"),
        encode(np.dstack([arr, np.full(arr.shape[:2], 7, np.uint8)]), "PNG"),
    ]
    for data in cases:
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(decode_bgr(data)[:, :, ::-1], ref)
        assert read_image_header(data)[:2] == (120, 90)
    # reduced (DCT-scaled) decoding equals Pillow's draft mode
    im = Image.open(io.BytesIO(cases[0]))
    im.draft("RGB", (60, 45))
    assert np.array_equal(decode_bgr(cases[0], 2)[:, :, ::-1], np.asarray(im.convert("RGB")))
    for garbage in (b"", b"not an image at all", cases[0][:40]):
        with pytest.raises(ValueError):
            test_transform(32)(garbage, random.Random(0))


def _jpeg_variants(arr: np.ndarray) -> dict:
    """The JPEG layouts a web crawl brings: every chroma subsampling, grey, progressive, restart markers."""
    bgr = np.ascontiguousarray(arr[:, :, ::-1])

    def cv2_jpeg(*params):
        return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90, *params])[1].tobytes()

    return {
        "4:2:0": encode(arr, quality=90),
        "4:4:4": encode(arr, quality=90, subsampling=0),
        "4:2:2": encode(arr, quality=90, subsampling=1),
        "grey": encode(np.asarray(Image.fromarray(arr).convert("L"))),
        "progressive": encode(arr, quality=90, progressive=True),
        "4:1:1": cv2_jpeg(cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411),
        "4:4:0": cv2_jpeg(cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440),
        "restart markers": cv2_jpeg(cv2.IMWRITE_JPEG_RST_INTERVAL, 3),
    }


def test_crop_decoder_is_built():
    assert crop_decoder_available(), (
        "albef.data._jpegcrop is not compiled: `make setup` builds it (needs gcc and libjpeg62-turbo-dev; as root "
        "`make setup` installs them); without it the loader falls back to whole-image decoding"
    )


@pytest.mark.skipif(
    not crop_decoder_available(), reason="albef.data._jpegcrop not built (see test_crop_decoder_is_built)"
)
def test_crop_decoding_is_bit_identical_to_a_full_decode(monkeypatch):
    """Every crop, at every DCT scale, equals the same crop of OpenCV's full decode (= Pillow's), including its
    edge columns (where a naive crop decode's upsampling differs) and its first rows after skipped ones."""
    rng = random.Random(0)
    reduced = {
        1: cv2.IMREAD_COLOR,
        2: cv2.IMREAD_REDUCED_COLOR_2,
        4: cv2.IMREAD_REDUCED_COLOR_4,
        8: cv2.IMREAD_REDUCED_COLOR_8,
    }
    for name, data in _jpeg_variants(photo(203, 157, seed=3)).items():
        assert read_image_header(data) == (203, 157, "JPEG"), name
        for factor, flag in reduced.items():
            full = cv2.imdecode(np.frombuffer(data, np.uint8), flag)[:, :, ::-1]
            assert full.shape[:2] == (-(-157 // factor), -(-203 // factor))
            height, width = full.shape[:2]
            boxes = [(0, 0, height, width), (height - 1, width - 1, 1, 1)]
            boxes += [
                (rng.randint(0, height - h), rng.randint(0, width - w), h, w)
                for h, w in ((rng.randint(1, height), rng.randint(1, width)) for _ in range(12))
            ]
            for top, left, h, w in boxes:
                crop = decode_jpeg_crop(data, top, left, h, w, factor)
                assert crop.shape == (h, w, 3) and crop.flags.c_contiguous
                assert np.array_equal(crop, full[top : top + h, left : left + w]), (name, factor, (top, left, h, w))
    data = encode(photo(64, 48))
    with pytest.raises(ValueError, match="outside the 64x48 image"):
        decode_jpeg_crop(data, 40, 0, 9, 10)
    with pytest.raises(ValueError, match="outside the 64x48 image"):  # no unsigned wrap-around
        decode_jpeg_crop(data, 0, 2**32 - 8, 4, 16)
    # a header promising more pixels than Pillow accepts by default is refused before anything is allocated, even
    # where data_prep lifted Pillow's own (global) limit in the same process
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    bomb = bytearray(encode(photo(16, 16)))
    sof = bomb.index(b"\xff\xc0")
    bomb[sof + 5 : sof + 9] = (30000).to_bytes(2, "big") + (30000).to_bytes(2, "big")
    with pytest.raises(ValueError, match="decompression bomb"):
        test_transform(32)(bytes(bomb), random.Random(0))
    for garbage in (b"\xff\xd8 not a jpeg", data[:60]):
        with pytest.raises(ValueError, match="JPEG"):
            test_transform(32)(garbage, random.Random(0))
    # a truncated file is an error, as for OpenCV (a bad sample for the loader), even when the crop is above the cut
    cut = data[: len(data) * 2 // 3]
    assert cv2.imdecode(np.frombuffer(cut, np.uint8), cv2.IMREAD_COLOR) is None
    for box in ((0, 0, 48, 64), (0, 0, 8, 8)):
        with pytest.raises(ValueError, match="Premature end of JPEG file"):
            decode_jpeg_crop(cut, *box)


def test_cmyk_jpegs_and_other_formats_take_the_whole_image_path():
    arr = photo(80, 60, seed=5)
    cmyk = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(cmyk, "JPEG", quality=95)
    for data in (cmyk.getvalue(), encode(arr, "PNG"), encode(arr, "WEBP", lossless=True)):
        ref = resize_bicubic(np.ascontiguousarray(decode_bgr(data)[:, :, ::-1]), 32, 32)
        assert np.array_equal(test_transform(32, draft=False)(data, random.Random(0)), ref)
        pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.BICUBIC))
        assert np.abs(ref.astype(int) - pil).max() <= 2  # OpenCV's CMYK->RGB rounds 1 below Pillow's


def test_pretrain_transform_equals_official_crop_resize_flip():
    """Our decode + RandomResizedCrop + flip == torchvision's on the PIL image with the same draws (+-1)."""
    data = encode(photo(200, 150, seed=9), quality=92)
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    ours_t = ImageTransform(64, (0.2, 1.0), flip=True, randaugment=False, draft=False)  # exact path
    for seed in range(12):
        ours = ours_t(data, random.Random(seed))
        rng = random.Random(seed)
        top, left, h, w = random_resized_crop_params(150, 200, (0.2, 1.0), CROP_RATIO, rng)
        ref = tvf.resized_crop(pil, top, left, h, w, [64, 64], tv.InterpolationMode.BICUBIC)
        if rng.random() < 0.5:
            ref = tvf.hflip(ref)
        assert np.abs(ours.astype(int) - np.asarray(ref)).max() <= 1, seed


def test_transform_shapes_determinism_and_variants():
    data = encode(photo(200, 150, seed=11))
    for make, res in ((pretrain_transform, 48), (finetune_transform, 40), (test_transform, 32)):
        t = make(res)
        a, b = t(data, random.Random(1)), t(data, random.Random(1))
        assert a.shape == (res, res, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b)
    assert not np.array_equal(
        pretrain_transform(48)(data, random.Random(1)), pretrain_transform(48)(data, random.Random(2))
    )
    assert pretrain_transform().crop_scale == (0.2, 1.0) and finetune_transform().crop_scale == (0.5, 1.0)
    assert finetune_transform().res == 384 and finetune_transform().randaugment is not None
    # test transform: Resize((res, res), bicubic), no randomness
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.BICUBIC))
    assert np.abs(test_transform(32, draft=False)(data, random.Random(5)).astype(int) - ref).max() <= 1


def test_draft_decoding_for_much_larger_images():
    # the reduced crop keeps >= 2x res pixels per side
    assert _draft_factor(1600, 1200, 1600, 1200, 128, "JPEG") == 4
    assert _draft_factor(1600, 1200, 1000, 900, 256, "JPEG") == 1  # crop < 4x res: full decode
    assert _draft_factor(1600, 1200, 1100, 1030, 256, "JPEG") == 2
    assert _draft_factor(4000, 3000, 4000, 3000, 128, "JPEG") == 8
    assert _draft_factor(1600, 1200, 1600, 1200, 128, "PNG") == 1
    data = encode(photo(1600, 1200, seed=13), quality=90)
    fast = test_transform(128, draft=True)(data, random.Random(0))
    full = test_transform(128, draft=False)(data, random.Random(0))
    assert fast.shape == full.shape == (128, 128, 3)
    assert np.abs(fast.astype(int) - full).mean() < 1.0  # a pre-reduction, not a visible change
