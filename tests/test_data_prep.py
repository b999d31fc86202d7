"""data_prep.download against a real HTTP server on 127.0.0.1 serving real photos (JPEG/PNG/WebP) and faults;
plus the list readers, the image pipeline and the URL/robots rules it relies on.

Run: .venv/bin/python -m pytest tests/test_data_prep.py -q
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
import struct
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data_prep import download, shards
from data_prep.images import ImageOptions, SampleError, process_image
from data_prep.inputs import InputError, ListSpec, iter_rows, resolve_inputs
from data_prep.loopback import LoopbackServer, Route, real_photos
from data_prep.net import Fetcher, FetchOptions, opted_out, split_url


def reencode(data: bytes, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, fmt, **kw)
    return out.getvalue()


def exif_rotated_jpeg(data: bytes) -> bytes:
    """The photo stored landscape with EXIF orientation 6: viewers (and we) must show it portrait."""
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def png_bomb(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (400 M pixels) that compresses to ~50 KB."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" + b"\x00" * (side // 8)
    raw = zlib.compressobj(9)
    idat = b"".join(raw.compress(row) for _ in range(side)) + raw.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def photos():
    p = real_photos()
    return {
        "astronaut.png": p["astronaut.png"],
        "chelsea.webp": reencode(p["chelsea.png"], "WEBP", quality=80),
        "coffee.jpg": reencode(p["coffee.png"], "JPEG", quality=90),
        "rocket.jpg": p["rocket.jpg"],
        "hubble.jpg": p["hubble_deep_field.jpg"],
        "retina.jpg": p["retina.jpg"],
        "ihc.png": p["ihc.png"],
        "moto.jpg": reencode(p["motorcycle_left.png"], "JPEG", quality=85),
        "flaky.jpg": reencode(p["chelsea.png"], "JPEG", quality=85),
        "rotated.jpg": exif_rotated_jpeg(p["rocket.jpg"]),
        "camera.png": p["camera.png"],
    }


# (path, route) in input-row order (None: not served); shard size 6 gives 5 shards; comments give the row number.
def fault_routes(photos):
    big = bytes(np.random.default_rng(0).integers(0, 256, 3 * 2**20, dtype=np.uint8))
    panorama, tiny = io.BytesIO(), io.BytesIO()
    Image.open(io.BytesIO(photos["hubble.jpg"])).crop((0, 0, 1000, 100)).save(panorama, "JPEG")
    Image.open(io.BytesIO(photos["ihc.png"])).resize((8, 8)).save(tiny, "PNG")

    def img(name, **kw):
        return Route(photos[name], content_type="image/" + name.rsplit(".", 1)[1].replace("jpg", "jpeg"), **kw)

    listed = [
        ("/p/astronaut.png", img("astronaut.png")),  # 0  success (PNG)
        ("/p/chelsea.webp", img("chelsea.webp")),  # 1  success (WebP)
        ("/missing", Route(status=404, body=b"gone", content_type="text/plain")),  # 2  http 404
        ("/p/hubble.jpg", img("hubble.jpg")),  # 3  success (JPEG)
        ("/copy/hubble.jpg", img("hubble.jpg")),  # 4  same bytes as row 3, same shard: duplicate_content
        ("/stall.jpg", img("rocket.jpg", stall=30)),  # 5  timeout (retried once)
        ("/p/coffee.jpg", img("coffee.jpg")),  # 6  success
        ("/truncated.jpg", img("moto.jpg", truncate_to=5000)),  # 7  truncated body (retried once)
        ("/page.html", Route(b"<html><body>hello</body></html>", content_type="text/html")),  # 8  not an image
        ("/p/rocket.jpg", img("rocket.jpg")),  # 9  success
        ("/bomb.png", Route(png_bomb(), content_type="image/png")),  # 10 decompression bomb
        ("/loop-a", Route(redirect="/loop-b")),  # 11 redirect loop
        ("/copy/astronaut.png", img("astronaut.png")),  # 12 same bytes as row 0, another shard: duplicate_content
        ("/noai.jpg", img("coffee.jpg", headers=(("X-Robots-Tag", "noai, noimageai"),))),  # 13 opted_out
        ("/p/rocket.jpg", None),  # 14 duplicate URL of row 9
        ("/always500", Route(status=500, body=b"boom", content_type="text/plain")),  # 15 http 500 (retried once)
        ("/huge.jpg", Route(big)),  # 16 more than --max-bytes
        ("/garbage.jpg", Route(big[:4096])),  # 17 not an image
        ("/tiny.png", Route(tiny.getvalue(), content_type="image/png")),  # 18 below --min-image-size
        ("/panorama.jpg", Route(panorama.getvalue())),  # 19 above --max-aspect-ratio
        ("ftp://example.com/a.jpg", None),  # 20 unsupported scheme
        ("", None),  # 21 empty URL
        ("/redirect", Route(redirect="/p/moto.jpg")),  # 22 302 -> success
        ("/flaky.jpg", img("flaky.jpg", fail_first=1)),  # 23 500, then 200 on the retry
        ("/p/retina.jpg", img("retina.jpg")),  # 24 success
        ("/p/camera.png", img("camera.png")),  # 25 success (grayscale photo)
        ("/p/rotated.jpg", img("rotated.jpg")),  # 26 success (EXIF orientation 6)
    ]
    unlisted = {"/loop-b": Route(redirect="/loop-a"), "/p/moto.jpg": img("moto.jpg")}
    return listed, {**{p: r for p, r in listed if r is not None}, **unlisted}


EXPECTED_STATUS = {
    "success": 10,
    "duplicate_content": 2,
    "duplicate_url": 1,
    "failed_to_download": 7,
    "failed_to_decode": 2,
    "filtered": 2,
    "opted_out": 1,
    "invalid_url": 2,
}
EXPECTED_ERRORS = {
    "http 404": 1,
    "timeout": 1,
    "truncated body": 1,
    "not an image (text/html)": 1,
    "decompression bomb": 1,
    "too many redirects": 1,
    "X-Robots-Tag noai": 1,
    "http 500": 1,
    "too large": 1,
    "unidentified image format": 1,
    "image too small": 1,
    "aspect ratio too large": 1,
    "unsupported scheme": 1,
    "empty url": 1,
}
SUCCESS_ROWS = {
    0: "astronaut.png",
    1: "chelsea.webp",
    3: "hubble.jpg",
    6: "coffee.jpg",
    9: "rocket.jpg",
    22: "moto.jpg",
    23: "flaky.jpg",
    24: "retina.jpg",
    25: "camera.png",
    26: "rotated.jpg",
}


def write_list(tmp_path: Path, server: LoopbackServer, listed) -> Path:
    lines = ["url\tcaption\tsource"]
    for row, (path, _) in enumerate(listed):
        url = server.url(path) if path.startswith("/") else path
        lines.append(f"{url}\tcaption {row}: a photo of {path}\tsrc{row}")
    tsv = tmp_path / "urls.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    return tsv


def run_download(tsv: Path, out: Path, *extra: str) -> int:
    return download.main(
        [
            str(tsv),
            "--output",
            str(out),
            "--allow-network",
            "127.0.0.0/8",
            "--timeout",
            "1",
            "--retries",
            "1",
            "--backoff",
            "0.05",
            "--max-bytes",
            str(2 * 2**20),
            "--shard-size",
            "6",
            "--image-size",
            "64",
            "--min-image-size",
            "32",
            "--max-aspect-ratio",
            "4",
            "--processes",
            "1",
            "--threads",
            "8",
            "--no-progress",
            *extra,
        ]
    )


def read_samples(out: Path):
    """{key: {ext: bytes}} over the published shards, asserting that no key appears twice."""
    samples = {}
    for tar in sorted(out.glob("[0-9]" * 6 + ".tar")):
        for key, members in shards.iter_tar_samples(tar):
            assert key not in samples, f"{key} twice"
            samples[key] = members
    return samples


def test_download_faults_exact_stats_and_webdataset_readback(tmp_path, photos):
    listed, routes = fault_routes(photos)
    with LoopbackServer(routes) as server:
        tsv = write_list(tmp_path, server, listed)
        out = tmp_path / "out"
        assert run_download(tsv, out) == 0

        totals = shards.merge_stats(out)
        status = {k.split(".", 1)[1]: v for k, v in totals.items() if k.startswith("status.") and v}
        errors = {k.split(".", 1)[1]: v for k, v in totals.items() if k.startswith("errors.")}
        assert status == EXPECTED_STATUS
        assert errors == EXPECTED_ERRORS
        assert totals["count"] == len(listed) == 27
        hits = server.hits
        assert hits["/flaky.jpg"] == hits["/always500"] == hits["/stall.jpg"] == hits["/truncated.jpg"] == 2, hits
        assert hits["/missing"] == hits["/page.html"] == hits["/noai.jpg"] == hits["/huge.jpg"] == 1
        assert hits["/p/rocket.jpg"] == 1  # the duplicate URL is not fetched again
        assert hits["/loop-a"] + hits["/loop-b"] == 6  # first request + --max-redirects 5

        manifest = shards.read_manifest(out)
        assert manifest["num_samples"] == 10
        assert [s["num_samples"] for s in manifest["shards"]] == [3, 2, 0, 2, 3]
        assert manifest["status"] == EXPECTED_STATUS
        assert not list(out.glob("*.tmp")) and not list((out / "_work").glob("*.tar"))

        samples = read_samples(out)
        assert sorted(samples) == [f"{r:09d}" for r in sorted(SUCCESS_ROWS)]  # every good image exactly once
        for tar in out.glob("*.tar"):  # member names come from row numbers, never from URLs; in row order
            with tarfile.open(tar) as t:
                assert all(re.fullmatch(r"\d{9}\.(jpg|txt|json)", name) for name in t.getnames())
                keys = [name.partition(".")[0] for name in t.getnames()[::3]]
                assert keys == sorted(keys), (tar.name, keys)
        for row, name in SUCCESS_ROWS.items():
            members = samples[f"{row:09d}"]
            meta = json.loads(members["json"])
            assert meta["sha256"] == hashlib.sha256(photos[name]).hexdigest()
            assert members["txt"].decode() == meta["caption"] == f"caption {row}: a photo of {listed[row][0]}"
            assert (meta["row"], meta["status"], meta["extra"]) == (row, "success", {"source": f"src{row}"})
            assert meta["url"] == server.url(listed[row][0])
            im = Image.open(io.BytesIO(members["jpg"]))
            assert (im.format, im.mode, min(im.size)) == ("JPEG", "RGB", 64)
            assert im.size == (meta["width"], meta["height"])
            assert abs(im.width / im.height - meta["original_width"] / meta["original_height"]) < 0.03
        rotated = json.loads(samples[f"{26:09d}"]["json"])
        assert (rotated["original_width"], rotated["original_height"], rotated["height"]) == (427, 640, 96)

        loaded = wds.WebDataset(str(out / "{000000..000004}.tar"), shardshuffle=False).decode("pil")
        assert sorted((s["__key__"], s["jpg"].size) for s in loaded) == sorted(
            (k, Image.open(io.BytesIO(m["jpg"])).size) for k, m in samples.items()
        )

        before, hits_before = {p.name: p.read_bytes() for p in out.glob("*.tar")}, sum(server.hits.values())
        assert run_download(tsv, out) == 0  # a rerun finds every shard done: nothing fetched, nothing changed
        assert sum(server.hits.values()) == hits_before
        assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before


def test_private_and_loopback_addresses_are_refused_by_default(tmp_path, photos):
    with LoopbackServer({"/a.jpg": Route(photos["rocket.jpg"])}) as server:
        urls = [
            server.url("/a.jpg"),
            f"http://localhost:{server.port}/a.jpg",
            f"http://[::1]:{server.port}/a.jpg",
            "http://10.1.2.3/a.jpg",
            "http://169.254.169.254/latest/meta-data/",
        ]
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
        assert (
            download.main(
                [str(tmp_path / "urls.txt"), "-o", str(tmp_path / "out"), "--processes", "1", "--no-progress"]
            )
            == 0
        )
        totals = shards.merge_stats(tmp_path / "out")
        assert totals["status.invalid_url"] == 5 and totals["errors.private network address refused"] == 5
        assert totals["num_samples"] == 0 and sum(server.hits.values()) == 0


def test_fetcher_rules(photos):
    assert split_url("https://Example.com/a b.jpg?x=1#frag") == ("https", "example.com", 443, "/a%20b.jpg?x=1")
    for bad, message in [
        ("ftp://x/a.jpg", "unsupported scheme"),
        ("http:///a.jpg", "no host"),
        ("http://x:99999/", "malformed url"),
        (None, "url is not a string"),
    ]:
        with pytest.raises(SampleError, match=message):
            split_url(bad)
    assert opted_out(["noai"]) == "noai" and opted_out(["NoImageAI"]) == "noimageai"
    assert opted_out(["*: noindex"]) == "noindex" and opted_out(["albef-data-prep: noai"]) == "noai"
    assert opted_out(["none"]) == "none"  # noindex + nofollow
    assert opted_out(["googlebot: noai", "noarchive, nofollow", "unavailable_after: 25 Jun 2030 15:00:00 PST"]) is None

    photo = photos["rocket.jpg"]
    routes = {
        "/noai.jpg": Route(photo, headers=(("X-Robots-Tag", "noai"),)),
        "/gz.jpg": Route(gzip.compress(photo), headers=(("Content-Encoding", "gzip"),)),
        "/hop": Route(redirect="/gz.jpg"),
        "/slow.jpg": Route(photo, delay=2.0),
    }
    with LoopbackServer(routes) as server:
        lenient = Fetcher(
            FetchOptions(allow_networks=("127.0.0.0/8",), respect_robots_tag=False, timeout=0.5, retries=0)
        )
        assert lenient.fetch(server.url("/noai.jpg")) == photo
        assert lenient.fetch(server.url("/hop")) == photo  # redirect, then gzip content-encoding undone
        with pytest.raises(SampleError, match="timeout"):
            lenient.fetch(server.url("/slow.jpg"))  # a deadline per attempt, not per socket read
        strict = Fetcher(FetchOptions(allow_networks=("127.0.0.0/8",), max_redirects=0, max_bytes=len(photo) - 1))
        with pytest.raises(SampleError, match="too many redirects"):
            strict.fetch(server.url("/hop"))
        with pytest.raises(SampleError, match="X-Robots-Tag noai") as err:
            strict.fetch(server.url("/noai.jpg"))
        assert err.value.status == "opted_out"


RECORDS = [
    {"url": "http://a.test/1.jpg", "caption": "one", "w": 10},
    {"url": "http://a.test/2.jpg", "caption": 'two, with "quotes" and a comma', "w": 20},
    {"url": "http://a.test/3.jpg", "caption": "three", "w": 30},
]


def test_list_formats_give_the_same_rows(tmp_path):

    folder = tmp_path / "lists"
    folder.mkdir()
    with open(folder / "a.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["url", "caption", "w"])
        writer.writeheader()
        writer.writerows(RECORDS)
    (folder / "b.tsv").write_text("".join(f"{r['caption']}\t{r['url']}\t{r['w']}\n" for r in RECORDS))
    with gzip.open(folder / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in RECORDS)
    (folder / "d.json").write_text(json.dumps(RECORDS))
    pq.write_table(pa.Table.from_pylist(RECORDS), folder / "e.parquet", row_group_size=1)
    (folder / "f.txt").write_text("".join(r["url"] + "\n\n" for r in RECORDS))
    (folder / "notes.md").write_text("not a list")

    files = resolve_inputs([str(folder)])
    assert [f.name for f in files] == ["a.csv", "b.tsv", "c.jsonl.gz", "d.json", "e.parquet", "f.txt"]
    expected = [(r["url"], r["caption"], {"w": r["w"]}) for r in RECORDS]
    for path in files[:5]:
        spec = ListSpec(files=(str(path),), columns=("caption", "url", "w") if path.suffix == ".tsv" else None)
        rows = [(r["url"], r["caption"], r["extra"]) for r in iter_rows(spec)]
        if path.suffix in (".csv", ".tsv"):  # text formats have no types
            rows = [(u, c, {"w": int(e["w"])}) for u, c, e in rows]
        assert rows == expected, path.name
    assert [r["url"] for r in iter_rows(ListSpec(files=(str(files[4]),)), url_only=True)] == [r["url"] for r in RECORDS]
    txt = list(iter_rows(ListSpec(files=(str(files[5]),), caption_col=None)))
    assert [(r["url"], r["caption"], r["extra"]) for r in txt] == [(r["url"], "", {}) for r in RECORDS]
    chosen = ListSpec(files=(str(files[4]),), url_col="caption", caption_col="url", extra_cols=())
    assert next(iter_rows(chosen)) == {"url": "one", "caption": "http://a.test/1.jpg", "extra": {}}
    (tmp_path / "n.jsonl").write_text(json.dumps({"url": " http://a.test/n.jpg\n", "caption": ["two\nlines ", "x"]}))
    row = next(iter_rows(ListSpec(files=(str(tmp_path / "n.jsonl"),))))  # captions are stored one per line
    assert (row["url"], row["caption"]) == ("http://a.test/n.jpg", ["two lines", "x"])


def test_bad_lists_are_reported_with_file_line_and_column(tmp_path, capsys):
    (tmp_path / "a.csv").write_text("URL,TEXT\nhttp://a.test/1.jpg,one\n")
    with pytest.raises(InputError, match=r"a\.csv: no column 'url'; its columns are \['URL', 'TEXT'\]"):
        list(iter_rows(ListSpec(files=(str(tmp_path / "a.csv"),))))
    (tmp_path / "b.jsonl").write_text('{"url": "http://a.test/1.jpg", "caption": "x"}\n{"url": \n')
    with pytest.raises(InputError, match=r"b\.jsonl:2: invalid JSON"):
        list(iter_rows(ListSpec(files=(str(tmp_path / "b.jsonl"),))))
    (tmp_path / "c.tsv.gz").write_bytes(b"this is not gzip")
    with pytest.raises(InputError, match=r"c\.tsv\.gz: cannot read as a tsv list: BadGzipFile"):
        list(iter_rows(ListSpec(files=(str(tmp_path / "c.tsv.gz"),))))
    (tmp_path / "d.xlsx").touch()
    with pytest.raises(InputError, match=r"d\.xlsx: unknown list format 'xlsx'"):
        resolve_inputs([str(tmp_path / "a.csv"), str(tmp_path / "d.xlsx")])
    assert download.main([str(tmp_path / "a.csv"), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "a.csv: no column 'url'; its columns are ['URL', 'TEXT']" in capsys.readouterr().err
    (tmp_path / "e.csv").write_text("URL,TEXT\nftp://a.test/1.jpg,one\n")
    assert (
        download.main(
            [
                str(tmp_path / "e.csv"),
                "-o",
                str(tmp_path / "out2"),
                "--url-col",
                "URL",
                "--caption-col",
                "TEXT",
                "--processes",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert shards.merge_stats(tmp_path / "out2")["status.invalid_url"] == 1


def test_resize_modes_exif_alpha_and_decode_errors(photos):
    coffee = photos["coffee.jpg"]  # 600 x 400

    def size(data, **kw):
        return Image.open(io.BytesIO(process_image(data, ImageOptions(**kw)).data)).size

    assert size(coffee, image_size=100) == (150, 100)
    assert size(coffee, image_size=100, resize_side="longest") == (100, 67)
    assert size(coffee, image_size=100, resize_mode="center_crop") == (100, 100)
    assert size(coffee, image_size=1000, resize_only_if_bigger=True) == (600, 400)
    assert process_image(coffee, ImageOptions(resize_mode="no")).data == coffee  # an RGB JPEG is kept as it is
    bordered = Image.open(io.BytesIO(process_image(coffee, ImageOptions(image_size=100, resize_mode="border")).data))
    assert bordered.size == (100, 100) and min(bordered.getpixel((50, 2))) > 245  # white band above the photo
    assert size(photos["rotated.jpg"], image_size=64) == (64, 96)
    assert Image.open(io.BytesIO(process_image(photos["camera.png"], ImageOptions(image_size=64)).data)).mode == "RGB"

    rgba = Image.open(io.BytesIO(photos["astronaut.png"])).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0).point(lambda _: 0))  # fully transparent
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    flat = Image.open(io.BytesIO(process_image(buf.getvalue(), ImageOptions(image_size=32)).data))
    assert min(flat.getpixel((16, 16))) > 245  # transparent pixels become white, not black

    # JPEG draft decoding (1/2..1/8 scale) keeps the result close to a full decode + resize.
    retina = photos["retina.jpg"]  # 1411 x 1411
    fast = np.asarray(Image.open(io.BytesIO(process_image(retina, ImageOptions(image_size=128, quality=100)).data)))
    full = np.asarray(Image.open(io.BytesIO(retina)).convert("RGB").resize((128, 128), Image.Resampling.BICUBIC))
    assert fast.shape == full.shape and np.abs(fast.astype(int) - full).mean() < 3

    for data, status, message in [
        (png_bomb(), "failed_to_decode", "decompression bomb"),
        (b"\x00" * 1000, "failed_to_decode", "unidentified image format"),
        (retina[: len(retina) // 2], "failed_to_decode", "truncated image"),
    ]:
        with pytest.raises(SampleError, match=message) as err:
            process_image(data, ImageOptions())
        assert err.value.status == status
    with pytest.raises(SampleError, match="decompression bomb"):
        process_image(coffee, ImageOptions(max_image_pixels=600 * 400 - 1))


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def test_strips_are_refused_before_decoding_and_outputs_are_bounded(photos):
    """A 1x3000 PNG of a few hundred bytes, scaled so its shortest side is 384 px, was a 384 x 1,152,000 image
    (1.3 GB of RGB); a 1x100 one was stored as a 384 x 38400 JPEG. The default aspect-ratio cap refuses both, and
    without the cap the output-pixel budget does."""
    strips = {"1x3000": _png(1, 3000), "3000x1": _png(3000, 1), "1x100": _png(1, 100)}
    assert all(len(data) < 1000 for data in strips.values())
    for name, data in strips.items():
        with pytest.raises(SampleError, match="aspect ratio too large") as err:
            process_image(data, ImageOptions(image_size=384))
        assert err.value.status == "filtered", name
        with pytest.raises(SampleError, match=r"output too large \(\d+ pixels > 1474560\)"):
            process_image(data, ImageOptions(image_size=384, max_aspect_ratio=None))
    photo = reencode(photos["coffee.jpg"], "JPEG")
    out = process_image(photo, ImageOptions(image_size=384))
    assert (out.width, out.height) == (576, 384)
    with pytest.raises(SampleError, match=r"output too large \(221184 pixels > 200000\)"):
        process_image(photo, ImageOptions(image_size=384, max_output_pixels=200_000))
    # The budget counts what is stored: a centre crop of a wide image is a square.
    strip = _png(1000, 100)
    assert process_image(strip, ImageOptions(image_size=64, resize_mode="center_crop")).width == 64
    with pytest.raises(SampleError, match="output too large"):
        process_image(strip, ImageOptions(image_size=64, resize_mode="keep_ratio", max_output_pixels=64 * 64 * 9))
    with pytest.raises(ValueError, match="max_aspect_ratio must be >= 1"):
        ImageOptions(max_aspect_ratio=0.5)


def test_pixel_budget_bounds_what_threads_hold_at_once():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from data_prep.images import PixelBudget

    budget = PixelBudget(1000)
    over = []
    lock = threading.Lock()
    holding = [0]

    def work(pixels):
        held = budget.acquire(pixels)
        with lock:
            holding[0] += held
            if holding[0] > 1000 and holding[0] != held:
                over.append(holding[0])
        time.sleep(0.002)
        with lock:
            holding[0] -= held
        budget.release(held)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(work, [300, 700, 450, 999, 2500, 10, 600] * 10))
    assert not over and budget.in_flight == 0
    assert budget.peak == 2500  # an image larger than the budget still goes, alone


def test_a_slow_decode_is_abandoned_at_its_deadline(photos):
    from data_prep.images import DecodeLimits

    big = io.BytesIO()
    Image.effect_noise((3000, 3000), 60).convert("RGB").save(big, "PNG", compress_level=1)
    with pytest.raises(SampleError, match=r"decode timeout \(over 0.001 s\)") as err:
        process_image(
            big.getvalue(),
            ImageOptions(image_size=64, max_aspect_ratio=None),
            limits=DecodeLimits(decode_timeout=0.001),
        )
    assert err.value.status == "failed_to_decode"
    assert process_image(big.getvalue(), ImageOptions(image_size=64)).width == 64  # the default limit: 30 s


def test_pathological_list_stays_within_memory(tmp_path, photos):
    """The four-URL list of the report peaked at 2.9-3.1 GB RSS; now the strips are filtered before decoding."""
    import subprocess
    import sys

    routes = {
        "/a.png": Route(_png(1, 3000), content_type="image/png"),
        "/b.png": Route(_png(3000, 1), content_type="image/png"),
        "/c.png": Route(_png(1, 100), content_type="image/png"),
        "/d.jpg": Route(reencode(photos["coffee.jpg"], "JPEG"), content_type="image/jpeg"),
    }
    with LoopbackServer(routes) as server:
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(server.url(p) + "\n" for p in routes))
        # The peak RSS of the CLI's process and of the worker processes it starts, measured in that process.
        argv = [
            str(urls),
            "--output",
            str(tmp_path / "o"),
            "--image-size",
            "384",
            "--allow-network",
            "127.0.0.0/8",
            "--processes",
            "1",
            "--no-progress",
        ]
        script = (
            "import resource, sys\nfrom data_prep import download\n"
            f"code = download.main({argv!r})\n"
            "peak = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))\n"
            "print('PEAK_KB', peak)\nsys.exit(code)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1]
        )
    assert out.returncode == 0, out.stderr
    peak_mb = int(out.stdout.split("PEAK_KB")[1].split()[0]) / 1024
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["status"] == {"success": 1, "filtered": 3}
    (sample,) = read_samples(tmp_path / "o").values()
    assert Image.open(io.BytesIO(sample["jpg"])).size == (576, 384)
    assert peak_mb < 700, peak_mb


TLS = (str(Path(__file__).parent / "tls" / "loopback.pem"), str(Path(__file__).parent / "tls" / "loopback.key"))


def test_tls_is_verified_and_never_downgraded(photos):
    """HTTPS from a self-signed server on 127.0.0.1: refused by default without a retry, accepted with --ca-bundle;
    a redirect from https to http is refused."""
    photo = photos["rocket.jpg"]
    with (
        LoopbackServer({"/a.jpg": Route(photo)}) as plain,
        LoopbackServer(
            {"/a.jpg": Route(photo), "/down": Route(redirect=plain.url("/a.jpg")), "/hop": Route(redirect="/a.jpg")},
            tls=TLS,
        ) as secure,
    ):
        assert secure.url("/a.jpg").startswith("https://127.0.0.1:")
        system_trust = Fetcher(FetchOptions(allow_networks=("127.0.0.0/8",), retries=3, backoff=0.01))
        with pytest.raises(SampleError, match=r"tls certificate error \(self.signed certificate\)") as err:
            system_trust.fetch(secure.url("/a.jpg"))
        assert err.value.status == "failed_to_download" and not err.value.retryable
        trusted = Fetcher(FetchOptions(allow_networks=("127.0.0.0/8",), ca_bundle=TLS[0], retries=3, backoff=0.01))
        assert trusted.fetch(secure.url("/a.jpg")) == photo
        assert trusted.fetch(secure.url("/hop")) == photo  # https -> https redirect
        with pytest.raises(SampleError, match="redirect from https to http refused"):
            trusted.fetch(secure.url("/down"))
        assert plain.hits["/a.jpg"] == 0
        assert trusted.fetch(plain.url("/a.jpg")) == photo  # plain http stays allowed
    with pytest.raises(ValueError, match="--ca-bundle 'nope.pem': no such file"):
        FetchOptions(ca_bundle="nope.pem")


def test_ipv6_forms_of_private_ipv4_are_refused_and_networks_are_allowed_by_cidr():
    from data_prep.net import is_public_address

    public = ["8.8.8.8", "2001:4860:4860::8888", "64:ff9b::808:808", "2002:808:808::1"]
    private = [
        "127.0.0.1",
        "10.1.2.3",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",  # IPv4-mapped
        "::7f00:1",
        "::a9fe:a9fe",  # IPv4-compatible (deprecated): 127.0.0.1, 169.254.169.254
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b:1::a00:1",  # NAT64
        "2002:7f00:1::",
        "2002:a9fe:a9fe::1",  # 6to4
        "2001:0:4136:e378:8000:63bf:80ff:fffe",
    ]  # Teredo: client 127.0.0.1 (obfuscated)
    assert [ip for ip in public if not is_public_address(ip)] == []
    assert [ip for ip in private if is_public_address(ip)] == []
    loopback = FetchOptions(allow_networks=("127.0.0.0/8",))
    assert loopback.allows("127.0.0.1") and loopback.allows("::ffff:127.0.0.1") and loopback.allows("64:ff9b::7f00:1")
    assert not loopback.allows("10.0.0.1") and not loopback.allows("::1") and loopback.allows("8.8.8.8")
    assert FetchOptions(allow_networks=("fc00::/7",)).allows("fd12::1")
    with pytest.raises(ValueError, match=r"--allow-network 'intranet' is not a network \(expected a CIDR"):
        FetchOptions(allow_networks=("intranet",))


def test_sha256_column_is_verified_before_decoding(tmp_path, photos):
    good, other = photos["rocket.jpg"], photos["coffee.jpg"]
    routes = {
        "/ok.jpg": Route(good),
        "/swapped.jpg": Route(other),
        "/bad-hash.jpg": Route(good),
        "/unchecked.jpg": Route(photos["retina.jpg"]),
    }
    with LoopbackServer(routes) as server:
        rows = [
            {"url": server.url("/ok.jpg"), "caption": "a rocket", "sha": hashlib.sha256(good).hexdigest().upper()},
            {
                "url": server.url("/swapped.jpg"),
                "caption": "not what was listed",
                "sha": hashlib.sha256(good).hexdigest(),
            },
            {"url": server.url("/bad-hash.jpg"), "caption": "malformed hash", "sha": "12ab"},
            {"url": server.url("/unchecked.jpg"), "caption": "no hash given", "sha": ""},
        ]
        (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert (
            download.main(
                [
                    str(tmp_path / "list.jsonl"),
                    "-o",
                    str(tmp_path / "out"),
                    "--sha256-col",
                    "sha",
                    "--allow-network",
                    "127.0.0.0/8",
                    "--processes",
                    "1",
                    "--no-progress",
                ]
            )
            == 0
        )
        assert server.hits["/bad-hash.jpg"] == 0  # a malformed hash is refused before fetching
    totals = shards.merge_stats(tmp_path / "out")
    assert (totals["status.success"], totals["status.hash_mismatch"]) == (2, 2)
    assert totals["errors.sha256 mismatch"] == 1
    assert totals["errors.malformed sha256 in the list (expected 64 hex digits)"] == 1
    metas = [json.loads(s["json"]) for s in read_samples(tmp_path / "out").values()]
    assert sorted(m["caption"] for m in metas) == ["a rocket", "no hash given"]
    assert "sha" not in metas[0].get("extra", {})  # the hash column is ours, not an extra
    assert (
        download.main(
            [str(tmp_path / "list.jsonl"), "-o", str(tmp_path / "out2"), "--sha256-col", "hash", "--no-progress"]
        )
        == 2
    )  # a missing column is named


ROBOTS = b"""# every other crawler: nothing
User-agent: *
Disallow: /

User-agent: albef-data-prep
Disallow: /private/
Allow: /private/*.public.jpg$
"""


def test_robots_txt_is_fetched_once_per_host_and_honoured(tmp_path, photos):
    def img(name):
        return Route(photos[name])

    site = {
        "/robots.txt": Route(ROBOTS, content_type="text/plain"),
        "/a.jpg": img("rocket.jpg"),
        "/private/b.jpg": img("coffee.jpg"),
        "/private/c.public.jpg": img("retina.jpg"),
        "/hop": Route(redirect="/private/b.jpg"),
    }
    broken = {"/robots.txt": Route(status=503, body=b"busy", content_type="text/plain"), "/d.jpg": img("camera.png")}
    with LoopbackServer(site) as server, LoopbackServer(broken) as down:
        urls = tmp_path / "urls.txt"
        urls.write_text(
            "".join(
                f"{u}\n"
                for u in [
                    server.url("/a.jpg"),
                    server.url("/private/b.jpg"),
                    server.url("/private/c.public.jpg"),
                    server.url("/hop"),
                    down.url("/d.jpg"),
                ]
            )
        )
        args = [
            str(urls),
            "--allow-network",
            "127.0.0.0/8",
            "--processes",
            "1",
            "--threads",
            "4",
            "--retries",
            "1",
            "--backoff",
            "0.01",
            "--no-progress",
        ]
        assert download.main([*args, "-o", str(tmp_path / "out")]) == 0
        totals = shards.merge_stats(tmp_path / "out")
        assert (totals["status.success"], totals["status.opted_out"], totals["status.failed_to_download"]) == (2, 2, 1)
        assert totals["errors.robots.txt"] == 2 and totals["errors.robots.txt unreachable (http 503)"] == 1
        assert server.hits["/robots.txt"] == 1  # once per host and process, although four threads asked
        assert server.hits["/private/b.jpg"] == 0 and server.hits["/hop"] == 1  # the redirect hop was checked
        assert down.hits["/robots.txt"] == 2 and down.hits["/d.jpg"] == 0  # 503: retried, then no fetch (RFC 9309)

        assert download.main([*args, "-o", str(tmp_path / "all"), "--ignore-robots-txt"]) == 0
        everything = shards.merge_stats(tmp_path / "all")
        assert (everything["status.success"], everything["status.duplicate_content"]) == (4, 1)  # /hop = b.jpg
        assert server.hits["/robots.txt"] == 1 and down.hits["/robots.txt"] == 2  # not asked again


def test_retry_failed_refetches_transient_rows_and_keeps_the_dataset_exact(tmp_path, photos, monkeypatch):
    """A run where a 503, a timeout and a permanent 500 were transient failures (a 404 is not); the server heals;
    --retry-failed fetches only those three rows and rewrites only the shards that change. The result equals a
    fresh run against the healed server, including content dedup: row 1 now succeeds with the bytes of row 6, so
    row 6 (another shard, kept until now) becomes duplicate_content. A kill in the middle of the rewrite resumes."""
    from data_prep import pipeline

    p = photos
    healthy = [
        ("/a", p["astronaut.png"]),
        ("/b", p["coffee.jpg"]),
        ("/c", None),
        ("/d", p["rocket.jpg"]),
        ("/e", p["retina.jpg"]),
        ("/f", p["hubble.jpg"]),
        ("/g", p["coffee.jpg"]),
        ("/h", p["camera.png"]),
        ("/i", p["moto.jpg"]),
        ("/j", p["chelsea.webp"]),
        ("/k", None),
        ("/l", p["ihc.png"]),
        ("/m", p["flaky.jpg"]),
        ("/n", p["rotated.jpg"]),
    ]
    routes = {path: Route(body) for path, body in healthy if body}
    routes.update(
        {
            "/c": Route(status=404, body=b"gone", content_type="text/plain"),
            "/k": Route(status=500, body=b"down", content_type="text/plain"),
        }
    )
    broken = {
        **routes,
        "/b": Route(status=503, body=b"busy", content_type="text/plain"),
        "/f": Route(p["hubble.jpg"], stall=30),
    }
    with LoopbackServer(broken) as server, LoopbackServer(routes) as fresh:

        def run(out, srv, *extra):
            (tmp_path / f"{out}.txt").write_text("".join(srv.url(path) + "\n" for path, _ in healthy))
            return download.main(
                [
                    str(tmp_path / f"{out}.txt"),
                    "-o",
                    str(tmp_path / out),
                    "--shard-size",
                    "4",
                    "--allow-network",
                    "127.0.0.0/8",
                    "--timeout",
                    "1",
                    "--retries",
                    "0",
                    "--ignore-robots-txt",
                    "--processes",
                    "1",
                    "--threads",
                    "4",
                    "--no-progress",
                    *extra,
                ]
            )

        assert run("ds", server) == 0
        first = shards.merge_stats(tmp_path / "ds")
        assert (first["status.success"], first["status.failed_to_download"]) == (10, 4)
        transient = [json.loads((tmp_path / "ds" / shards.stats_file(i)).read_text())["transient"] for i in range(4)]
        assert [[row for row, *_ in t] for t in transient] == [[1], [5], [10], []]  # the 404 is final
        untouched = {i: (tmp_path / "ds" / shards.shard_file(i)).stat().st_mtime_ns for i in (2, 3)}
        hits = dict(server.hits)

        server.routes.update({"/b": routes["/b"], "/f": routes["/f"]})  # the server heals, except /k
        real_apply = pipeline._apply_retry_plan

        def killed_after_one_shard(out, work, retry, plan):
            real_apply(out, work, retry, {"0": plan["0"]})
            raise KeyboardInterrupt

        monkeypatch.setattr(pipeline, "_apply_retry_plan", killed_after_one_shard)
        with pytest.raises(KeyboardInterrupt):
            run("ds", server, "--retry-failed")
        monkeypatch.undo()
        fetched = {path: n - hits.get(path, 0) for path, n in server.hits.items() if n != hits.get(path, 0)}
        assert fetched == {"/b": 1, "/f": 1, "/k": 1}  # only the transient rows, once each
        assert run("ds", server, "--retry-failed") == 0  # resumes the rewrite from its plan: nothing fetched
        assert sum(server.hits.values()) == sum(hits.values()) + 3

        assert run("fresh", fresh) == 0
    after = shards.merge_stats(tmp_path / "ds")
    assert (after["status.success"], after["status.duplicate_content"], after["status.failed_to_download"]) == (
        11,
        1,
        2,
    )
    assert {k: v for k, v in after.items() if k.startswith(("status.", "errors."))} == {
        k: v for k, v in shards.merge_stats(tmp_path / "fresh").items() if k.startswith(("status.", "errors."))
    }

    def content(out):
        return {k: (json.loads(m["json"])["sha256"], m["txt"], m["jpg"]) for k, m in read_samples(out).items()}

    ds, reference = content(tmp_path / "ds"), content(tmp_path / "fresh")
    assert sorted(ds) == sorted(reference) == [f"{r:09d}" for r in (0, 1, 3, 4, 5, 7, 8, 9, 11, 12, 13)]
    assert all(ds[k][:2] == reference[k][:2] for k in ds)  # same bytes, same captions (url differs: two servers)
    manifest = shards.read_manifest(tmp_path / "ds")
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 3, 3, 2] and manifest["num_samples"] == 11
    assert manifest["status"] == shards.read_manifest(tmp_path / "fresh")["status"]
    # shard 2 kept its samples (its /k failed again): only its stats changed; shard 3 had nothing to retry
    assert {i: (tmp_path / "ds" / shards.shard_file(i)).stat().st_mtime_ns for i in (2, 3)} == untouched
    assert json.loads((tmp_path / "ds" / shards.stats_file(2)).read_text())["transient"] == [
        [10, "failed_to_download", "http 500"]
    ]
    assert not (tmp_path / "ds" / "_work" / "retry").exists()
    loaded = wds.WebDataset(str(tmp_path / "ds" / "{000000..000003}.tar"), shardshuffle=False)
    assert sorted(s["__key__"] for s in loaded) == sorted(ds)
