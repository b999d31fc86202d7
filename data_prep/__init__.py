"""Data preparation: web crawls, URL+caption lists and local annotation files -> webdataset tar shards.

Run the steps as modules from the repository root, e.g. ``python -m data_prep.download --help``:

* ``data_prep.crawl``: WARC files / HTML pages -> a URL + alt-text list (parquet or jsonl);
* ``data_prep.download``: URL + caption lists (txt/csv/tsv/json/jsonl/parquet, .gz) -> shards;
* ``data_prep.annotations``: ALBEF / COCO / VG annotation JSON + an image folder -> shards.

The shard format is defined in ``albef.data.shards`` and written by ``data_prep.shards``; data_prep/README.md
documents the options, outputs and guarantees.
"""
