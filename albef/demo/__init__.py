"""The offline demo world (issue #10): everything a new user or CI needs to run the whole ALBEF pipeline in minutes
on a laptop CPU with no network.

* ``albef.demo.world``: a seeded procedural generator of a small, learnable vision-language world (coloured shapes
  on a 3x3 grid) written in the official ALBEF data formats of pretraining, retrieval, VQA, NLVR2, SNLI-VE and
  RefCOCO+ grounding (``python -m albef.demo.world --out DIR --seed 0``).
* ``albef.demo.photos``: a handful of real photos (shipped by scikit-image) with hand-written captions, served as a
  tiny web crawl (HTML pages with alt texts) on a loopback HTTP server.
"""
