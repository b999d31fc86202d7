"""Data preparation: web crawls, URL+caption lists and local annotation files -> webdataset tar shards.

Run the steps as modules from the repository root, e.g. ``python -m data_prep.download --help``.
"""
