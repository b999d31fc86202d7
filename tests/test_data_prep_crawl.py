"""data_prep.crawl on WARC files written here with warcio (gzip'd and plain) and on a folder of HTML pages; then
the extracted list goes through data_prep.download against a loopback server.

Run: .venv/bin/python -m pytest tests/test_data_prep_crawl.py -q
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from data_prep import crawl, download, shards
from data_prep.loopback import LoopbackServer, Route, real_photos

LONG_ALT = " ".join(["word"] * 70)
PAGE1 = f"""<!doctype html><html><head><title>Blog</title></head><body>
<img src="img/red-bike.jpg" alt="A red bicycle leaning on a brick wall">
<img src="/static/dog.png" alt="  Dog   running on
  the beach ">
<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw="
     data-src="//cdn.test/lazy/cat.webp" alt="Cat sleeping in a basket">
<img srcset="photos/sunset-480.jpg 480w, photos/sunset-960.jpg 960w" alt="Sunset over the harbour">
<img src="both-src.jpg" srcset="both-480.jpg 480w, both-960.jpg 960w" alt="An image with both src and srcset">
<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" srcset="lazy-1x.jpg 1x, lazy-2x.jpg 2x" alt="A lazy bridge">
<img src="data:image/png;base64,iVBORw0KGgo=" alt="Inline image of a tree">
<img src="logo.svg" alt="Company logo in blue">
<img src="pixel.gif" width="1" height="1" alt="tracking pixel for ads">
<img src="a.jpg" alt="Image">
<img src="b.jpg" alt="IMG_1234.JPG">
<img src="c.jpg" alt="Mountains">
<img src="d.jpg" alt="{LONG_ALT}">
<img src="e.jpg">
<img src="javascript:void(0)" alt="Broken link with a script">
<img alt="No source at all here">
<img src="img/red-bike.jpg#zoom" alt="The same bike again, other alt">
<IMG SRC="https://other.test/tom.jpg" ALT="Tom &amp; Jerry chasing each other"/>
</body></html>"""
PAGE2 = """<html><head><base href="http://cdn.test/assets/"></head><body>
<img src="coffee.jpg" alt="Café au lait on a wooden table"><img src="/static/dog.png" alt="Dog running on the beach">
</body></html>"""
PAGE3 = """<html><body><img src="pic.jpg" alt="Plain WARC picture of a lake">
<img src="https://other.test/tom.jpg" alt="Tom and Jerry again in a cartoon">
<img src="tower.jpg" alt="東京タワーの夜景"><img src="sunset.jpg" alt="海边的日落"><img src="seoul.jpg" alt="서울의 야경 사진">
</body></html>"""

POST = "http://site.test/blog/post.html"
EXPECTED_PAIRS = [
    ("http://site.test/blog/img/red-bike.jpg", "A red bicycle leaning on a brick wall", POST),
    ("http://site.test/static/dog.png", "Dog running on the beach", POST),
    ("http://cdn.test/lazy/cat.webp", "Cat sleeping in a basket", POST),
    ("http://site.test/blog/photos/sunset-960.jpg", "Sunset over the harbour", POST),  # the largest candidate
    ("http://site.test/blog/both-960.jpg", "An image with both src and srcset", POST),
    ("http://site.test/blog/lazy-2x.jpg", "A lazy bridge", POST),
    ("http://site.test/blog/c.jpg", "Mountains", POST),  # one word is a caption (--min-words 1)
    ("https://other.test/tom.jpg", "Tom & Jerry chasing each other", POST),
    ("http://cdn.test/assets/coffee.jpg", "Café au lait on a wooden table", "http://site.test/gallery/"),
    ("http://cdn.test/static/dog.png", "Dog running on the beach", "http://site.test/gallery/"),
    ("http://plain.test/pic.jpg", "Plain WARC picture of a lake", "http://plain.test/index.html"),
    ("http://plain.test/tower.jpg", "東京タワーの夜景", "http://plain.test/index.html"),
    ("http://plain.test/sunset.jpg", "海边的日落", "http://plain.test/index.html"),
    ("http://plain.test/seoul.jpg", "서울의 야경 사진", "http://plain.test/index.html"),
]
EXPECTED_DROPS = {
    "data_uri": 1,
    "not_image_url": 1,
    "declared_too_small": 1,
    "placeholder_text": 2,
    "too_many_words": 1,
    "no_alt": 1,
    "not_http": 1,
    "no_src": 1,
    "duplicate_url": 2,
}


def write_warc(path: Path, records, compress: bool) -> None:
    """records: (uri, record type, http status line or None, content type, body bytes)."""
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=compress)
        for uri, kind, status, ctype, body in records:
            if kind == "request":
                http = StatusAndHeaders(status, [("Host", "site.test")], is_http_request=True)
            elif kind == "response":
                http = StatusAndHeaders(status, [("Content-Type", ctype)], protocol="HTTP/1.1")
            else:
                http = None
            writer.write_record(
                writer.create_warc_record(
                    uri,
                    kind,
                    payload=io.BytesIO(body),
                    http_headers=http,
                    warc_content_type=ctype if kind == "resource" else "",
                )
            )


def make_warcs(folder: Path) -> None:
    folder.mkdir()
    write_warc(
        folder / "a.warc.gz",
        [
            ("http://site.test/blog/post.html", "request", "GET /blog/post.html HTTP/1.1", "", b""),
            ("http://site.test/blog/post.html", "response", "200 OK", "text/html; charset=utf-8", PAGE1.encode()),
            ("http://site.test/img/x.jpg", "response", "200 OK", "image/jpeg", real_photos()["rocket.jpg"]),
            (
                "http://site.test/missing",
                "response",
                "404 Not Found",
                "text/html",
                b'<img src="/gone.jpg" alt="A page that was not found">',
            ),
            (
                "http://site.test/gallery/",
                "response",
                "200 OK",
                "text/html; charset=iso-8859-1",
                PAGE2.encode("latin-1"),
            ),
        ],
        compress=True,
    )
    write_warc(
        folder / "b.warc",
        [("http://plain.test/index.html", "resource", None, "text/html", PAGE3.encode())],
        compress=False,
    )


def test_warc_extraction_gives_the_expected_pairs(tmp_path):
    make_warcs(tmp_path / "crawl")
    out = tmp_path / "pairs.parquet"
    assert crawl.main([str(tmp_path / "crawl"), "--output", str(out), "--no-progress"]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["url", "caption", "page_url"]
    assert [tuple(r.values()) for r in table.to_pylist()] == EXPECTED_PAIRS

    counts = crawl.run([str(tmp_path / "crawl")], tmp_path / "pairs.jsonl", crawl.CrawlFilter(), progress=False)
    assert (counts["pages"], counts["images"], counts["pairs"]) == (3, 25, 14)
    assert {k: v for k, v in counts.items() if k not in ("pages", "images", "pairs")} == EXPECTED_DROPS
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [(r["url"], r["caption"], r["page_url"]) for r in rows] == EXPECTED_PAIRS

    loose = crawl.CrawlFilter(min_words=1, max_words=100, banned=crawl.DEFAULT_BANNED | {"sunset over the harbour"})
    counts = crawl.run([str(tmp_path / "crawl")], tmp_path / "loose.jsonl", loose, progress=False)
    assert counts["pairs"] == 14 - 1 + 1 and counts["placeholder_text"] == 3  # +70 words, -sunset
    # Three words at least: the Chinese and Japanese alts count one word per character and stay (the old
    # whitespace count made each of them one word and dropped them).
    strict = crawl.run(
        [str(tmp_path / "crawl")], tmp_path / "strict.jsonl", crawl.CrawlFilter(min_words=3), progress=False
    )
    rows = [json.loads(line)["caption"] for line in (tmp_path / "strict.jsonl").read_text().splitlines()]
    assert strict["too_few_words"] == 1 and "Mountains" not in rows
    assert {"東京タワーの夜景", "海边的日落", "서울의 야경 사진"} <= set(rows)


def test_srcset_picks_the_largest_candidate_and_words_count_per_script():
    pick = lambda **attrs: crawl._image_src(attrs)  # noqa: E731
    assert pick(srcset="a.jpg 480w, b.jpg 1200w, c.jpg 960w") == ("b.jpg", None)
    assert pick(src="s.jpg", srcset="a.jpg 1.5x, b.jpg 3x") == ("b.jpg", None)
    assert pick(src="s.jpg", srcset="a.jpg 0.5x") == ("s.jpg", None)  # src is the 1x candidate
    assert pick(src="s.jpg", srcset="a.jpg 300w") == ("a.jpg", None)  # a width beats the implicit 1x
    assert pick(src="data:image/gif;base64,R0l=", **{"data-srcset": "l.jpg 100w, h.jpg 800w"}) == ("h.jpg", None)
    assert pick(srcset="data:image/png;base64,AA= 1x") == ("", "data_uri")
    assert pick(srcset="img/a,b.jpg 2x, c.jpg") == ("img/a,b.jpg", None)  # a comma inside a URL belongs to it
    assert crawl.srcset_candidates("a.jpg,b.jpg 2x, c.jpg 3x,") == [("a.jpg,b.jpg", "2x"), ("c.jpg", "3x")]
    words = {
        "A red bike": 3,
        "海边的日落": 5,
        "東京タワーの夜景": 8,
        "猫": 1,
        "日落。": 2,
        "iPhone手机": 3,
        "서울의 야경 사진": 3,
        "「猫」": 1,
    }
    assert {text: crawl.count_words(text) for text in words} == words


def test_html_folder_with_and_without_base_url(tmp_path):
    site = tmp_path / "mirror" / "site"
    site.mkdir(parents=True)
    (site / "index.html").write_text(
        '<img src="images/owl.jpg" alt="An owl perched on a branch at night">'
        '<img src="https://img.test/fox.jpg" alt="A fox crossing a snowy field">'
    )
    (site / "notes.txt").write_text("not a page")
    out = tmp_path / "pairs.jsonl.gz"
    assert (
        crawl.main([str(tmp_path / "mirror"), "--base-url", "https://example.org", "-o", str(out), "--no-progress"])
        == 0
    )
    rows = [json.loads(line) for line in gzip.open(out, "rt")]
    page = "https://example.org/site/index.html"
    assert rows == [
        {
            "url": "https://example.org/site/images/owl.jpg",
            "caption": "An owl perched on a branch at night",
            "page_url": page,
        },
        {"url": "https://img.test/fox.jpg", "caption": "A fox crossing a snowy field", "page_url": page},
    ]
    counts = crawl.run([str(site / "index.html")], tmp_path / "no_base.jsonl", crawl.CrawlFilter(), progress=False)
    assert counts["pairs"] == 1 and counts["relative_without_base"] == 1
    only = json.loads((tmp_path / "no_base.jsonl").read_text())
    assert only["url"] == "https://img.test/fox.jpg" and only["page_url"] == (site / "index.html").resolve().as_uri()


def test_crawl_output_feeds_the_downloader(tmp_path):
    photos = real_photos()
    routes = {"/a.jpg": Route(photos["rocket.jpg"]), "/b.png": Route(photos["coffee.png"], content_type="image/png")}
    with LoopbackServer(routes) as server:
        page = server.url("/page.html")
        html = '<img src="/a.jpg" alt="A rocket on the launch pad"><img src="b.png" alt="A cup of coffee, top view">'
        (tmp_path / "crawl").mkdir()
        write_warc(tmp_path / "crawl" / "c.warc.gz", [(page, "response", "200 OK", "text/html", html.encode())], True)
        assert crawl.main([str(tmp_path / "crawl"), "-o", str(tmp_path / "pairs.parquet"), "--no-progress"]) == 0
        assert (
            download.main(
                [
                    str(tmp_path / "pairs.parquet"),
                    "-o",
                    str(tmp_path / "ds"),
                    "--allow-network",
                    "127.0.0.0/8",
                    "--processes",
                    "1",
                    "--image-size",
                    "64",
                    "--no-progress",
                ]
            )
            == 0
        )
    samples = dict(shards.iter_tar_samples(tmp_path / "ds" / "000000.tar"))
    metas = sorted((json.loads(m["json"]) for m in samples.values()), key=lambda m: m["row"])
    assert [(m["url"], m["caption"], m["extra"]) for m in metas] == [
        (server.url("/a.jpg"), "A rocket on the launch pad", {"page_url": page}),
        (server.url("/b.png"), "A cup of coffee, top view", {"page_url": page}),
    ]


def test_pages_that_opt_out_keep_their_images_out(tmp_path, capsys):
    """<meta name="robots"> noai/noimageai/none (or for our token), and a WARC response's X-Robots-Tag."""

    def page(head, alt):
        return (
            f'<html><head>{head}</head><body><img src="a.jpg" alt="{alt} one"><img src="b.jpg" alt="{alt} two">'
            "</body></html>"
        )

    pages = [
        ("http://s.test/noai/", page('<meta name="robots" content="index, NoAI">', "no ai page"), []),
        ("http://s.test/none/", page('<meta name="robots" content="none">', "none page"), []),
        ("http://s.test/agent/", page('<meta name="albef-data-prep" content="noimageai">', "agent page"), []),
        ("http://s.test/other/", page('<meta name="googlebot" content="noai">', "other crawler page"), []),
        ("http://s.test/header/", page("", "header page"), [("X-Robots-Tag", "noimageindex")]),
        ("http://s.test/scoped/", page("", "scoped header page"), [("X-Robots-Tag", "otherbot: noai")]),
        ("http://s.test/open/", page('<meta name="robots" content="index, follow">', "open page"), []),
    ]
    (tmp_path / "crawl").mkdir()
    with open(tmp_path / "crawl" / "c.warc.gz", "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for uri, body, extra in pages:
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html"), *extra], protocol="HTTP/1.1")
            writer.write_record(
                writer.create_warc_record(uri, "response", payload=io.BytesIO(body.encode()), http_headers=http)
            )
    counts = crawl.run([str(tmp_path / "crawl")], tmp_path / "pairs.jsonl", crawl.CrawlFilter(), progress=False)
    kept = sorted(json.loads(line)["page_url"] for line in (tmp_path / "pairs.jsonl").read_text().splitlines())
    assert kept == [
        "http://s.test/open/",
        "http://s.test/open/",
        "http://s.test/other/",
        "http://s.test/other/",
        "http://s.test/scoped/",
        "http://s.test/scoped/",
    ]
    assert (counts["pages_opted_out"], counts["opted_out"], counts["images"], counts["pairs"]) == (4, 8, 14, 6)
    assert "4 pages opted out" in capsys.readouterr().out
    counts = crawl.run(
        [str(tmp_path / "crawl")], tmp_path / "all.jsonl", crawl.CrawlFilter(respect_opt_outs=False), progress=False
    )
    assert counts["pairs"] == 14
