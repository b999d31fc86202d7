"""Extract (image URL, alt text) pairs from web crawls into a URL+caption list for data_prep.download.

    python -m data_prep.crawl CC-MAIN-20240101-00000.warc.gz --output pairs/00000.parquet
    python -m data_prep.crawl saved_site/ --base-url https://example.com/ --output pairs.jsonl.gz
    python -m data_prep.download pairs/ --output data/crawl        # then download them

Inputs: WARC files (``.warc``, ``.warc.gz``; read with warcio: ``response``/``resource`` records with an HTML
content type and a 2xx status) and HTML files (``.html``, ``.htm``, ``.xhtml``), or folders holding them (searched
recursively, sorted). For each ``<img>``:

* the URL is the largest candidate of ``srcset`` (else ``data-srcset``): the largest width descriptor (``960w``),
  else the largest density (``2x``; ``src`` counts as ``1x``), because training wants the largest image; without a
  srcset it is ``src``, or when that is missing or a ``data:`` URI, ``data-src``. It is resolved against
  ``<base href>`` or the page URL (the WARC target URI, or ``--base-url`` + the file's path below the input folder
  for HTML files) and must end up http(s);
* dropped when the URL does not look like an image (``.svg``, ``.ico``, ``.js``, ``.html``... extensions), when the
  declared ``width``/``height`` is below ``--min-declared-size`` (tracking pixels), when the alt text has fewer than
  ``--min-words`` (default 1) or more than ``--max-words`` words, or is a placeholder (``image``, ``no image
  available``, ``click here``, a file name like ``IMG_1234.jpg``, ...; extend with ``--ban``). Words are
  whitespace-separated, except that every Chinese/Japanese character (Han, kana) counts as a word: those scripts do
  not separate words with spaces (Korean does);
* kept once per URL (the first occurrence in input order);
* none of a page's images are kept (each counted ``opted_out``) when the page opts out: a ``<meta name="robots">``
  (or ``<meta name="albef-data-prep">``) whose content has ``noai``, ``noimageai``, ``noindex``, ``noimageindex`` or
  ``none``, or the same in the ``X-Robots-Tag`` header of a WARC response (unscoped, or scoped to ``*`` or to us).

Output: parquet or jsonl (``.gz`` allowed), chosen by the ``--output`` suffix, with columns ``url``, ``caption``
(the alt text, whitespace collapsed) and ``page_url``. The end-of-run line counts pages, images and drops by reason.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple
from urllib.parse import urljoin, urlsplit, urlunsplit

from tqdm import tqdm

from data_prep.net import AGENT_TOKEN, opted_out

DEFAULT_BANNED = frozenset(
    {
        "image",
        "images",
        "photo",
        "picture",
        "img",
        "logo",
        "icon",
        "thumbnail",
        "thumb",
        "placeholder",
        "spacer",
        "blank",
        "untitled",
        "banner",
        "avatar",
        "loading",
        "advertisement",
        "no image",
        "no photo",
        "image not found",
        "no image available",
        "image not available",
        "photo not available",
        "image coming soon",
        "coming soon",
        "click here",
        "click to enlarge",
        "read more",
        "profile picture",
        "default image",
        "placeholder image",
        "image placeholder",
        "alt text",
        "featured image",
        "image description",
    }
)
_FILENAME_ALT = re.compile(r"^[\w\-. ]+\.(jpe?g|png|gif|webp|bmp|svg|tiff?)$", re.I)
_CAMERA_ALT = re.compile(r"^(img|dsc|dscn|dscf|pict|photo|image|screenshot)[\s_-]*\d+$", re.I)
_NON_IMAGE_EXT = frozenset(
    {
        "svg",
        "svgz",
        "ico",
        "js",
        "css",
        "html",
        "htm",
        "xml",
        "json",
        "pdf",
        "txt",
        "swf",
        "mp4",
        "webm",
        "mov",
        "mp3",
        "wav",
        "zip",
        "gz",
    }
)
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_HTML_SUFFIXES = (".html", ".htm", ".xhtml")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([\w-]+)""", re.I)


@dataclass(frozen=True)
class CrawlFilter:
    min_words: int = 1
    max_words: int = 64
    min_declared_size: int = 10
    banned: frozenset = DEFAULT_BANNED
    respect_opt_outs: bool = True  # <meta name="robots"> and X-Robots-Tag noai/noimageai/noindex/noimageindex/none


class _ImageTags(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.base: Optional[str] = None
        self.images: List[Dict[str, str]] = []
        self.robots: List[str] = []  # content of <meta name="robots"> and <meta name="albef-data-prep">

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "img":
            self.images.append({k: (v or "") for k, v in attrs})
        elif tag == "base" and self.base is None:
            self.base = dict(attrs).get("href") or None
        elif tag == "meta":
            a = {k: (v or "") for k, v in attrs}
            if a.get("name", "").strip().lower() in ("robots", AGENT_TOKEN):
                self.robots.append(a.get("content", ""))


def srcset_candidates(srcset: str) -> List[Tuple[str, str]]:
    """(url, descriptor) pairs of a srcset, parsed as the HTML standard does: a URL runs to the next whitespace
    (commas at its end separate candidates, commas inside belong to it); its descriptor runs to the next comma
    outside parentheses."""
    out, i, n = [], 0, len(srcset)
    while i < n:
        while i < n and (srcset[i].isspace() or srcset[i] == ","):
            i += 1
        start = i
        while i < n and not srcset[i].isspace():
            i += 1
        url = srcset[start:i]
        if not url:
            break
        if url.endswith(","):
            out.append((url.rstrip(","), ""))
            continue
        start, depth = i, 0
        while i < n and (srcset[i] != "," or depth):
            depth += {"(": 1, ")": -1}.get(srcset[i], 0)
            i += 1
        out.append((url, srcset[start:i].strip()))
    return out


def _descriptor_size(descriptor: str) -> Tuple[int, float]:
    """(1, width) for ``960w``, (0, density) for ``2x`` or nothing (1x); (-1, 0) for what does not parse."""
    d = descriptor.strip().lower()
    try:
        if d.endswith("w"):
            return 1, float(d[:-1])
        return 0, float(d[:-1]) if d.endswith("x") else (1.0 if not d else -1.0)
    except ValueError:
        return -1, 0.0


def _is_data_uri(url: str) -> bool:
    return url.lower().startswith("data:")


def _image_src(attrs: Dict[str, str]) -> Tuple[str, Optional[str]]:
    """The image URL of an <img>, or ("", reason)."""
    src = attrs.get("src", "").strip()
    saw_data_uri = False
    for name in ("srcset", "data-srcset"):
        candidates = srcset_candidates(attrs.get(name, ""))
        usable = [(u, d) for u, d in candidates if not _is_data_uri(u)]
        saw_data_uri |= len(usable) < len(candidates)
        if usable:
            if src and not _is_data_uri(src):
                usable.append((src, "1x"))  # src is the 1x candidate of a density srcset (it loses to any width)
            return max(usable, key=lambda c: _descriptor_size(c[1]))[0], None
    for name in ("src", "data-src"):
        value = attrs.get(name, "").strip()
        if _is_data_uri(value):
            saw_data_uri = True
        elif value:
            return value, None
    return "", "data_uri" if saw_data_uri else "no_src"


def _extension(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name.rpartition(".")[2].lower() if "." in name else ""


def _declared_too_small(attrs: Dict[str, str], minimum: int) -> bool:
    for name in ("width", "height"):
        value = attrs.get(name, "").strip().lower().removesuffix("px")
        if value.isdigit() and int(value) < minimum:
            return True
    return False


# Scripts written without spaces between words, whose characters each count as a word: CJK ideographs
# (unified, extension A, compatibility), hiragana, katakana (and its phonetic extensions, half-width forms).
_CJK_CHAR = re.compile(
    "[\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0002fa1f]"
)

_WORD_CHAR = re.compile(r"[^\W_]")  # a letter or digit of any script (not punctuation such as "。")


def count_words(text: str) -> int:
    """Whitespace-separated words; a Chinese or Japanese character is a word by itself (the rest of a token that
    mixes scripts, e.g. ``iPhone``, one more)."""
    total = 0
    for token in text.split():
        cjk = len(_CJK_CHAR.findall(token))
        total += cjk + (1 if cjk == 0 or _WORD_CHAR.search(_CJK_CHAR.sub("", token)) else 0)
    return total


def _caption_problem(alt: str, opt: CrawlFilter) -> Optional[str]:
    words = count_words(alt)
    if words == 0:
        return "no_alt"
    if alt.lower().strip(" .!:-") in opt.banned or _FILENAME_ALT.match(alt) or _CAMERA_ALT.match(alt):
        return "placeholder_text"
    if words < opt.min_words:
        return "too_few_words"
    if words > opt.max_words:
        return "too_many_words"
    return None


def extract_pairs(
    html: str, page_url: Optional[str], opt: CrawlFilter, counts: Counter, x_robots_tag: Sequence[str] = ()
) -> Iterator[Tuple[str, str]]:
    """(absolute image URL, alt text) of the usable <img> tags of one page; drops are counted in ``counts``.
    ``x_robots_tag``: the page's X-Robots-Tag header values (WARC responses)."""
    parser = _ImageTags()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # html.parser is lenient, but never let one page stop a crawl
        counts["page_parse_error"] += 1
    # <meta name="robots"> content reads as an unscoped X-Robots-Tag value ("noai, noimageai").
    if opt.respect_opt_outs and opted_out([*parser.robots, *x_robots_tag]):
        counts["pages_opted_out"] += 1
        counts["images"] += len(parser.images)
        counts["opted_out"] += len(parser.images)
        return
    base = urljoin(page_url, parser.base) if page_url and parser.base else (parser.base or page_url)
    for attrs in parser.images:
        counts["images"] += 1
        src, reason = _image_src(attrs)
        if not reason:
            parts = urlsplit(urljoin(base, src) if base else src)
            if not parts.scheme and not base:
                reason = "relative_without_base"
            elif parts.scheme not in ("http", "https") or not parts.netloc:
                reason = "not_http"
            elif _extension(parts.path) in _NON_IMAGE_EXT:
                reason = "not_image_url"
            elif _declared_too_small(attrs, opt.min_declared_size):
                reason = "declared_too_small"
        alt = " ".join(attrs.get("alt", "").split())
        reason = reason or _caption_problem(alt, opt)
        if reason:
            counts[reason] += 1
            continue
        yield urlunsplit(parts._replace(fragment="")), alt


def _decode(body: bytes, content_type: str) -> str:
    match = re.search(r"charset\s*=\s*[\"']?([\w-]+)", content_type or "", re.I) or _META_CHARSET.search(body[:4096])
    charset = match.group(1) if match else "utf-8"
    charset = charset.decode("ascii", "replace") if isinstance(charset, bytes) else charset
    try:
        return body.decode(charset, errors="replace")
    except LookupError:
        return body.decode("utf-8", errors="replace")


def _is_warc(path: Path) -> bool:
    return path.name.lower().endswith((".warc", ".warc.gz"))


def find_inputs(inputs: List[str]) -> List[Tuple[Path, Path]]:
    """(file, the input root it was found under) for every WARC/HTML file, in order."""
    found = []
    for item in inputs:
        root = Path(item)
        if root.is_dir():
            found += [
                (p, root)
                for p in sorted(root.rglob("*"))
                if p.is_file() and (_is_warc(p) or p.suffix.lower() in _HTML_SUFFIXES)
            ]
        elif root.is_file():
            found.append((root, root.parent))
        else:
            raise ValueError(f"{root}: no such file or folder")
    if not found:
        raise ValueError(f"no WARC or HTML files in {inputs}")
    return found


def _warc_pages(path: Path, bar: tqdm) -> Iterator[Tuple[Optional[str], str, List[str]]]:
    try:
        from warcio.archiveiterator import ArchiveIterator
    except ImportError:  # data_prep's own requirement, not the training machine's
        raise ImportError(
            f"{path}: reading WARC files needs warcio: pip install -r requirements-data-prep.txt"
        ) from None

    with open(path, "rb") as f:
        position = 0
        for record in ArchiveIterator(f):
            if record.rec_type in ("response", "resource"):
                headers = record.http_headers if record.rec_type == "response" else record.rec_headers
                status = record.http_headers.get_statuscode() if record.rec_type == "response" else "200"
                ctype = (headers.get_header("Content-Type") or "") if headers else ""
                if status and status.startswith("2") and ctype.split(";")[0].strip().lower() in _HTML_TYPES:
                    body = record.content_stream().read()
                    url = (record.rec_headers.get_header("WARC-Target-URI") or "").strip("<> ") or None
                    robots = (
                        [v for k, v in headers.headers if k.lower() == "x-robots-tag"]
                        if record.rec_type == "response"
                        else []
                    )
                    yield url, _decode(body, ctype), robots
            bar.update(f.tell() - position)
            position = f.tell()


def iter_pages(
    files: List[Tuple[Path, Path]], base_url: Optional[str], bar: tqdm
) -> Iterator[Tuple[Optional[str], str, str, List[str]]]:
    """(page URL for resolving or None, page URL to record, HTML text, X-Robots-Tag values) for every page."""
    for path, root in files:
        if _is_warc(path):
            for url, html, robots in _warc_pages(path, bar):
                yield url, url, html, robots
            continue
        body = path.read_bytes()
        bar.update(len(body))
        relative = path.relative_to(root).as_posix()
        url = urljoin(base_url if base_url.endswith("/") else base_url + "/", relative) if base_url else None
        yield url, url or path.resolve().as_uri(), _decode(body, ""), []


class PairWriter:
    """Writes url/caption/page_url rows to parquet (record batches) or jsonl (optionally gzip'd)."""

    def __init__(self, path: Path, batch_rows: int = 10_000):
        self.path, self.batch_rows, self.rows = path, batch_rows, []
        path.parent.mkdir(parents=True, exist_ok=True)
        name = path.name.lower()
        self.parquet = name.endswith(".parquet")
        if not self.parquet and not name.endswith((".jsonl", ".jsonl.gz")):
            raise ValueError(f"{path}: the output must end with .parquet, .jsonl or .jsonl.gz")
        self.tmp = path.with_name(path.name + ".tmp")
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("page_url", pa.string())])
            self._writer = pq.ParquetWriter(self.tmp, self.schema)
        else:
            self._file = (
                gzip.open(self.tmp, "wt", encoding="utf-8")
                if name.endswith(".gz")
                else open(self.tmp, "w", encoding="utf-8")
            )

    def write(self, url: str, caption: str, page_url: str) -> None:
        self.rows.append({"url": url, "caption": caption, "page_url": page_url})
        if len(self.rows) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if self.parquet:
            import pyarrow as pa

            self._writer.write_batch(pa.RecordBatch.from_pylist(self.rows, schema=self.schema))
        else:
            self._file.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows)
        self.rows = []

    def close(self) -> None:
        if self.rows:
            self._flush()
        (self._writer if self.parquet else self._file).close()
        self.tmp.replace(self.path)  # no half-written list under the final name


def run(
    inputs: List[str], output: Path, opt: CrawlFilter, base_url: Optional[str] = None, progress: bool = True
) -> Counter:
    files = find_inputs(inputs)
    counts: Counter = Counter()
    seen: Set[int] = set()
    start = time.monotonic()
    writer = PairWriter(output)
    total = sum(path.stat().st_size for path, _ in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="crawl", disable=not progress) as bar:
        for resolve_url, page_url, html, robots in iter_pages(files, base_url, bar):
            counts["pages"] += 1
            for url, alt in extract_pairs(html, resolve_url, opt, counts, robots):
                h = int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "little")
                if h in seen:
                    counts["duplicate_url"] += 1
                    continue
                seen.add(h)
                counts["pairs"] += 1
                writer.write(url, alt, page_url)
            bar.set_postfix(pairs=counts["pairs"], refresh=False)
    writer.close()
    dropped = " ".join(
        f"{k}={v}" for k, v in sorted(counts.items()) if k not in ("pages", "images", "pairs", "pages_opted_out")
    )
    opted = f" | {counts['pages_opted_out']} pages opted out (noai, ...)" if counts["pages_opted_out"] else ""
    print(
        f"data_prep.crawl: {len(files)} files, {counts['pages']} pages, {counts['images']} images -> "
        f"{counts['pairs']} pairs in {output} ({time.monotonic() - start:.1f}s) | dropped: {dropped or 'none'}"
        f"{opted}"
    )
    return counts


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.crawl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("inputs", nargs="+", help="WARC files, HTML files, or folders of them")
    p.add_argument("--output", "-o", required=True, type=Path, help=".parquet, .jsonl or .jsonl.gz")
    p.add_argument("--base-url", default=None, help="URL of the input folder, for relative links in HTML files")
    d = CrawlFilter()
    p.add_argument("--min-words", type=int, default=d.min_words, help="(default %(default)s)")
    p.add_argument("--max-words", type=int, default=d.max_words, help="(default %(default)s)")
    p.add_argument(
        "--min-declared-size",
        type=int,
        default=d.min_declared_size,
        help="drop <img> whose width/height attribute is below this (default %(default)s)",
    )
    p.add_argument("--ban", action="append", default=[], help="another placeholder alt text to drop (repeatable)")
    p.add_argument(
        "--ignore-robots-meta",
        dest="respect_opt_outs",
        action="store_false",
        help="keep the images of pages whose <meta name=robots> or X-Robots-Tag opts out (noai, ...)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    opt = CrawlFilter(
        args.min_words,
        args.max_words,
        args.min_declared_size,
        DEFAULT_BANNED | {b.lower().strip() for b in args.ban},
        args.respect_opt_outs,
    )
    try:
        run(args.inputs, args.output, opt, args.base_url, args.progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
