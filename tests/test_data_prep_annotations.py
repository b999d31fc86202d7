"""data_prep.annotations: the official ALBEF JSON, COCO captions and VG region descriptions over a folder of real
photos -> the same shard format and manifest as the downloader (read back with webdataset).

Run: .venv/bin/python -m pytest tests/test_data_prep_annotations.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds

from data_prep import annotations, shards
from data_prep.loopback import real_photos


def make_tree(root: Path) -> dict:
    photos = real_photos()
    files = {
        "albef/a.jpg": photos["rocket.jpg"],
        "albef/b.png": photos["chelsea.png"],
        "albef/copy_coffee.png": photos["coffee.png"],
        "coco/train2014/COCO_1.png": photos["coffee.png"],
        "coco/train2014/COCO_2.jpg": photos["hubble_deep_field.jpg"],
        "VG_100K/1.jpg": photos["retina.jpg"],
        "VG_100K_2/2.png": photos["ihc.png"],
        "VG_100K_2/2.jpg": photos["astronaut.png"],
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_albef_coco_vg_annotations_to_shards(tmp_path):
    root = tmp_path / "images"
    make_tree(root)
    albef = [
        {"image": "albef/a.jpg", "caption": "a rocket on the launch pad"},
        {"image": "albef/b.png", "caption": ["a tabby cat", "a cat looking at the camera"], "source": "web"},
        {"image": "albef/a.jpg", "caption": "a rocket before launch, seen from afar"},
        {"image": "albef/missing.jpg", "caption": "no file for this one"},
        {"image": str(root / "albef/copy_coffee.png"), "caption": "coffee in a cup"},
        {"image": "albef/a.jpg", "caption": "a rocket on the launch pad "},
    ]
    coco = {
        "images": [
            {"id": 1, "file_name": "coco/train2014/COCO_1.png"},
            {"id": 2, "file_name": "coco/train2014/COCO_2.jpg"},
            {"id": 3, "file_name": "coco/train2014/COCO_3.jpg"},
        ],
        "annotations": [
            {"image_id": 1, "caption": "a cup of coffee"},
            {"image_id": 2, "caption": "the deep sky full of galaxies"},
            {"image_id": 1, "caption": "coffee on a saucer"},
            {"image_id": 2, "caption": "  "},
        ],
    }
    vg = [
        {
            "id": 1,
            "regions": [
                {"region_id": 7, "image_id": 1, "phrase": "a bright red eye", "x": 1, "y": 2},
                {"phrase": "dark blood vessels"},
                {"phrase": "a bright red eye"},
            ],
        },
        {"id": 2, "regions": [{"phrase": "stained tissue"}]},
        {"id": 3, "regions": []},
    ]
    files = []
    for name, data in [("albef.json", albef), ("coco.json", coco), ("vg.json", vg)]:
        files.append(str(tmp_path / name))
        (tmp_path / name).write_text(json.dumps(data))

    out = tmp_path / "ds"
    assert (
        annotations.main(
            [
                *files,
                "--image-root",
                str(root),
                "--output",
                str(out),
                "--shard-size",
                "3",
                "--processes",
                "2",
                "--threads",
                "2",
                "--image-size",
                "64",
                "--no-progress",
            ]
        )
        == 0
    )

    manifest = shards.read_manifest(out)
    assert manifest["status"] == {"success": 6, "missing_image": 1, "duplicate_content": 1}
    assert [s["num_samples"] for s in manifest["shards"]] == [2, 2, 2] and manifest["num_samples"] == 6
    assert manifest["created_by"] == "data_prep.annotations"
    loaded = wds.WebDataset(str(out / "{000000..000002}.tar"), shardshuffle=False).decode("pil")
    got = {
        s["__key__"]: (s["txt"], json.loads(s["json"]) if isinstance(s["json"], bytes) else s["json"], s["jpg"])
        for s in loaded
    }
    captions = {k: (meta["image"], text) for k, (text, meta, _) in got.items()}
    assert captions == {
        "000000000": ("albef/a.jpg", "a rocket on the launch pad\na rocket before launch, seen from afar"),
        "000000001": ("albef/b.png", "a tabby cat\na cat looking at the camera"),
        "000000003": (str(root / "albef/copy_coffee.png"), "coffee in a cup"),
        # row 4 (COCO_1.png) holds the same bytes as row 3: dropped as duplicate_content
        "000000005": ("coco/train2014/COCO_2.jpg", "the deep sky full of galaxies"),
        "000000006": ("1.jpg", "a bright red eye\ndark blood vessels"),
        "000000007": ("2.jpg", "stained tissue"),
    }
    for key, (_, meta, image) in got.items():
        assert image.mode == "RGB" and min(image.size) == 64 and meta["status"] == "success"
    assert got["000000001"][1]["extra"] == {"source": "web"} and got["000000005"][1]["extra"] == {"image_id": 2}
    assert got["000000007"][1]["original_width"] == 512  # VG_100K_2/2.jpg (the astronaut), found after VG_100K/
    errors = {k: v for k, v in shards.merge_stats(out).items() if k.startswith("errors.")}
    assert errors == {"errors.image file not found": 1}


def test_bad_annotation_files_are_named(tmp_path, capsys):
    (tmp_path / "odd.json").write_text(json.dumps({"foo": 1}))
    (tmp_path / "coco.json").write_text(
        json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [{"image_id": 1, "text": "oops"}]})
    )
    (tmp_path / "broken.json").write_text("[{")
    for name, message in [
        ("odd.json", "odd.json: not an ALBEF, COCO-captions or VG region-descriptions file"),
        ("coco.json", "coco.json: malformed coco annotations (KeyError: 'caption')"),
        ("broken.json", "broken.json: cannot read annotations"),
    ]:
        assert (
            annotations.main(
                [str(tmp_path / name), "--image-root", str(tmp_path), "-o", str(tmp_path / "o"), "--no-progress"]
            )
            == 2
        )
        assert message in capsys.readouterr().err
