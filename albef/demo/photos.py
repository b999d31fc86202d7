"""Real photos with hand-written captions, served as a tiny web crawl on a loopback HTTP server (issue #10).

No public image-text data ships offline, so the demo's "web crawl" is a small site built from eight photos that
scikit-image ships in its wheel. The captions were written for this project by looking at each image. Licences,
as stated in ``skimage.data``'s docstrings:

* astronaut: Eileen Collins, from NASA. No known copyright restrictions, released into the public domain.
* chelsea: a cat. CC0 by the photographer, Stefan van der Walt.
* coffee: an espresso cup. CC0 by the photographer, Rachel Michetti (courtesy of Pikolo Espresso Bar).
* rocket: the Falcon 9 launch of DSCOVR. Captured by SpaceX and released into the public domain.
* hubble: the Hubble eXtreme Deep Field. NASA, may be freely used in the public domain.
* camera: a man with a camera on a tripod, greyscale. CC0 by the photographer, Lav Varshney.
* coins: Greek coins from Pompeii, greyscale, from the Brooklyn Museum collection. No known copyright restrictions.
* retina: a fundus photograph by Mikael Häggström, from Wikimedia. CC0 1.0.

Install: ``pip install --no-deps scikit-image``. The wheel is 13.7 MB and this module only reads its ``data/``
files. scikit-image is never imported, so its dependencies (scipy, ...) are not needed.

The site (``write_crawl_site``) has ``urls.txt`` (the page URLs to crawl, one per line, in sorted path order),
five HTML pages and ``img/``. Each photo is stored in three sizes, ``NAME.jpg`` (at most 320 px), ``NAME_m.jpg``
(256 px) and ``NAME_s.jpg`` (192 px). They are JPEG, greyscale JPEG for camera and coins, and PNG for retina.
``img/`` also holds a logo PNG and a spacer GIF. Every kept caption has its own image URL, so an extractor that
keeps one caption per URL and one that keeps every (URL, caption) pair expect the same list.

The ``<img>`` tags cover what a crawl extractor meets:
* relative (``img/x.jpg``, ``../img/x.jpg``), root-relative (``/img/x.jpg``) and absolute (``http://...``) URLs;
* a ``srcset`` whose ``src`` is a smaller copy that the site does not even serve (an extractor must take the
  largest candidate);
* ``alt`` written before ``src``;
* upper-case ``<IMG SRC ALT>``;
* HTML entities and line breaks inside ``alt``;
* a ``data:`` URI;
* an empty alt on a 1-px spacer, a missing alt, a placeholder alt (``Logo``) and a file-name alt
  (``IMG_0042.JPG``);
* a 1-word alt and a 70-word alt;
* the same (image, caption) on two pages through two different relative URLs;
* a second, different alt for an image already captioned earlier on the same page;
* a link to an image that does not exist (404).

``expected_pairs(base_url)`` lists the (image URL, caption) pairs a typical extractor keeps, in crawl order. The
rules follow the defaults of ``data_prep.crawl``. The typical extractor:
* visits pages in ``urls.txt`` order (sorted file order) and tags in document order;
* takes the largest ``srcset`` candidate, else ``src``, and resolves it against the page URL;
* skips ``data:`` URIs;
* unescapes the alt and collapses its whitespace;
* drops missing and empty alts, placeholder alts (``PLACEHOLDER_ALTS``, case-insensitive) and file-name alts;
* drops alts with fewer than ``MIN_WORDS`` or more than ``MAX_WORDS`` words;
* keeps the first usable caption of each URL.
Kept alts have 7-16 words and dropped ones 1 (on an URL captioned earlier) or 70, so any word bounds in 1-7 and
16-69 give the same list. Each
pair also says whether its image can be downloaded (the 404 one cannot). ``dropped_tags(base_url)`` lists the tags
that must not survive, each with the reason.

Run: ``python -m albef.demo.photos --out /tmp/site`` writes the site and serves it until Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import functools
import html
import importlib.util
import io
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from PIL import Image, ImageDraw

# name: (file in skimage/data, file extension on the site, captions written for the photo)
PHOTOS: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {
    "astronaut": (
        "astronaut.png",
        "jpg",
        (
            "a smiling astronaut in an orange spacesuit in front of an american flag",
            "portrait of a woman astronaut holding a helmet next to a model of the space shuttle",
            "an astronaut with short hair wearing an orange flight suit",
        ),
    ),
    "chelsea": (
        "chelsea.png",
        "jpg",
        (
            "close up of a tabby cat with green eyes",
            "the face of a brown striped cat looking to the side",
            "a cat with long white whiskers and a pink nose",
        ),
    ),
    "coffee": (
        "coffee.png",
        "jpg",
        (
            "a cup of espresso on a red saucer with a spoon",
            "a red and white coffee cup on a wooden table",
            "espresso with crema in a small cup & saucer",
        ),
    ),
    "rocket": (
        "rocket.jpg",
        "jpg",
        ("a white rocket on the launch pad at dusk", "a falcon 9 rocket standing between tall towers before launch"),
    ),
    "hubble": (
        "hubble_deep_field.jpg",
        "jpg",
        ("thousands of distant galaxies on a black sky", "a deep field image of space taken by the hubble telescope"),
    ),
    "camera": (
        "camera.png",
        "jpg",
        (
            "a black and white photo of a man filming with a camera on a tripod",
            "a man in a dark coat looking through a camera on a grassy field",
        ),
    ),
    "coins": (
        "coins.png",
        "jpg",
        ("rows of ancient greek coins on a dark background", "a black and white photo of old silver coins"),
    ),
    "retina": (
        "retina.jpg",
        "png",
        ("a photograph of the back of a human eye showing blood vessels", "an orange retina with red blood vessels"),
    ),
}
MIN_WORDS, MAX_WORDS = 1, 64
PLACEHOLDER_ALTS = ("image", "img", "photo", "picture", "logo", "icon", "spacer", "untitled", "placeholder")
PAGES = ("index.html", "pages/animals.html", "pages/kitchen.html", "pages/people.html", "pages/space.html")
VARIANTS = {"": 320, "_m": 256, "_s": 192}  # file-name suffix: longest side in pixels
MISSING = "img/croissants.jpg"
SPAM = " ".join(["best coffee espresso cup buy cheap coffee online shop free shipping beans machine latte"] * 5)


def photo_source(name: str) -> Path:
    """The photo's file inside the installed scikit-image wheel (found without importing scikit-image)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the demo photos come from scikit-image: pip install --no-deps scikit-image")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / PHOTOS[name][0]


def load_photo(name: str, max_side: int = VARIANTS[""]) -> Image.Image:
    """The photo downscaled to at most max_side px (greyscale photos stay greyscale)."""
    image = Image.open(photo_source(name))
    image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image


def _tags(base_url: str) -> List[Tuple[str, str, str, str, str]]:
    """Every <img> of the site: (page, tag, resolved image URL or "", expected caption or "", why it is dropped)."""

    def img(page, src, name, k, path, extra=""):  # a kept tag: caption k of photo `name`
        caption = PHOTOS[name][2][k]
        return page, f'<img src="{src}" alt="{html.escape(caption)}"{extra}>', f"{base_url}/{path}", caption, ""

    def bad(page, tag, path, why):
        return page, tag, f"{base_url}/{path}" if path else "", "", why

    dot = base64.b64encode(_encode(Image.new("RGB", (2, 2), (255, 0, 0)), "PNG")).decode()
    chelsea0 = html.escape(PHOTOS["chelsea"][2][0])
    return [
        img("index.html", "img/chelsea.jpg", "chelsea", 0, "img/chelsea.jpg"),
        bad("index.html", '<img src="img/logo.png" alt="Logo">', "img/logo.png", "placeholder alt"),
        bad("index.html", '<img src="img/spacer.gif" alt="" width="1">', "img/spacer.gif", "empty alt"),
        img("index.html", "/img/rocket.jpg", "rocket", 0, "img/rocket.jpg", ' width="320"'),
        bad(
            "pages/animals.html",
            f'<img src="../img/chelsea.jpg" alt="{chelsea0}">',
            "img/chelsea.jpg",
            "same URL and caption as on index.html",
        ),
        img("pages/animals.html", "/img/chelsea_m.jpg", "chelsea", 1, "img/chelsea_m.jpg"),
        bad(
            "pages/animals.html",
            '<img src="../img/chelsea_m.jpg" alt="cat">',
            "img/chelsea_m.jpg",
            "URL already captioned above (a one-word alt)",
        ),
        img("pages/animals.html", "../img/chelsea_s.jpg", "chelsea", 2, "img/chelsea_s.jpg"),
        bad(
            "pages/animals.html",
            '<img src="../img/chelsea_s.jpg" alt="a close up of a cat">',
            "img/chelsea_s.jpg",
            "URL already captioned above",
        ),
        img(
            "pages/kitchen.html",
            "../img/coffee_xs.jpg",
            "coffee",
            0,
            "img/coffee_s.jpg",
            ' srcset="../img/coffee_xs.jpg 1x, ../img/coffee_s.jpg 2x"',
        ),  # coffee_xs.jpg is not on the site
        (
            "pages/kitchen.html",
            f'<IMG SRC="../img/coffee.jpg" ALT="{PHOTOS["coffee"][2][1]}">',
            f"{base_url}/img/coffee.jpg",
            PHOTOS["coffee"][2][1],
            "",
        ),
        img("pages/kitchen.html", "../img/coffee_m.jpg", "coffee", 2, "img/coffee_m.jpg"),
        bad("pages/kitchen.html", f'<img src="../img/coffee_m.jpg" alt="{SPAM}">', "img/coffee_m.jpg", "70 words"),
        (
            "pages/kitchen.html",
            f'<img src="../{MISSING}" alt="a plate of fresh croissants next to a jug of milk">',
            f"{base_url}/{MISSING}",
            "a plate of fresh croissants next to a jug of milk",
            "",
        ),
        bad(
            "pages/people.html",
            '<img src="../img/camera_s.jpg" alt="IMG_0042.JPG">',
            "img/camera_s.jpg",
            "file-name alt",
        ),
        img("pages/people.html", "../img/camera.jpg", "camera", 0, "img/camera.jpg"),
        img("pages/people.html", "/img/camera_m.jpg", "camera", 1, "img/camera_m.jpg"),
        img("pages/people.html", "/img/astronaut_m.jpg", "astronaut", 1, "img/astronaut_m.jpg"),
        img("pages/people.html", "../img/astronaut_s.jpg", "astronaut", 2, "img/astronaut_s.jpg"),
        img("pages/people.html", "../img/coins.jpg", "coins", 0, "img/coins.jpg"),
        img("pages/people.html", f"{base_url}/img/coins_m.jpg", "coins", 1, "img/coins_m.jpg"),
        bad("pages/people.html", '<img src="../img/retina_s.png">', "img/retina_s.png", "no alt"),
        img("pages/people.html", "../img/retina.png", "retina", 0, "img/retina.png"),
        img("pages/people.html", "../img/retina_m.png", "retina", 1, "img/retina_m.png"),
        img("pages/space.html", "../img/astronaut.jpg", "astronaut", 0, "img/astronaut.jpg"),
        img("pages/space.html", f"{base_url}/img/rocket_m.jpg", "rocket", 1, "img/rocket_m.jpg"),
        (
            "pages/space.html",
            f'<img alt="{PHOTOS["hubble"][2][0]}" loading="lazy" src="../img/hubble.jpg">',
            f"{base_url}/img/hubble.jpg",
            PHOTOS["hubble"][2][0],
            "",
        ),
        (
            "pages/space.html",
            '<img src="/img/hubble_m.jpg"\n     alt="a deep field image of space\n      taken by the  hubble telescope">',
            f"{base_url}/img/hubble_m.jpg",
            PHOTOS["hubble"][2][1],
            "",
        ),
        bad(
            "pages/space.html",
            f'<img src="data:image/png;base64,{dot}" alt="a tiny red square drawn inline">',
            "",
            "data: URI",
        ),
    ]


def expected_pairs(base_url: str) -> List[dict]:
    """The (url, caption) pairs a typical extractor keeps, in crawl order, with "downloadable" (False: a 404)."""
    return [
        {"url": u, "caption": c, "page": f"{base_url}/{p}", "downloadable": not u.endswith(MISSING)}
        for p, _, u, c, why in _tags(base_url)
        if not why
    ]


def dropped_tags(base_url: str) -> List[dict]:
    """The <img> tags that must not yield a pair, with the reason."""
    return [{"page": f"{base_url}/{p}", "tag": t, "reason": why} for p, t, _, _, why in _tags(base_url) if why]


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_crawl_site(out_dir, base_url: str) -> List[str]:
    """Write the site to out_dir for serving at base_url (absolute links embed it); returns the page URLs."""
    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    (out / "pages").mkdir(exist_ok=True)
    for name, (_, ext, _) in PHOTOS.items():
        for suffix, side in VARIANTS.items():
            photo = load_photo(name, side)
            (out / "img" / f"{name}{suffix}.{ext}").write_bytes(_encode(photo, "PNG" if ext == "png" else "JPEG"))
    logo = Image.new("RGB", (96, 32), (20, 60, 140))
    ImageDraw.Draw(logo).ellipse((4, 4, 28, 28), fill=(250, 200, 40))
    (out / "img" / "logo.png").write_bytes(_encode(logo, "PNG"))
    (out / "img" / "spacer.gif").write_bytes(_encode(Image.new("L", (1, 1), 255), "GIF"))
    tags = _tags(base_url)
    for page in PAGES:
        up = "../" * page.count("/")
        links = " | ".join(f'<a href="{up}{p}">{Path(p).stem}</a>' for p in PAGES)
        body = "\n".join(f"<p>{t}</p>" for p, t, *_ in tags if p == page)
        (out / page).write_text(
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{Path(page).stem}'
            f"</title></head>\n<body>\n<nav>{links}</nav>\n<h1>{Path(page).stem}</h1>\n{body}\n"
            "</body></html>\n"
        )
    urls = [f"{base_url}/{p}" for p in PAGES]
    (out / "urls.txt").write_text("\n".join(urls) + "\n")
    return urls


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(directory) -> Tuple[str, Callable[[], None]]:
    """Serve directory over HTTP on 127.0.0.1 (a free port) in a daemon thread: (base_url, stop)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join()

    return f"http://127.0.0.1:{server.server_address[1]}", stop


def start_crawl_site(out_dir) -> Tuple[str, List[str], Callable[[], None]]:
    """Serve out_dir, write the site into it for that address: (base_url, page URLs, stop)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    base_url, stop = serve(out_dir)
    return base_url, write_crawl_site(out_dir, base_url), stop


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    base_url, urls, stop = start_crawl_site(a.out)
    print(f"serving {a.out} at {base_url}; pages listed in {Path(a.out) / 'urls.txt'} (Ctrl-C stops)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        stop()


if __name__ == "__main__":
    main()
