"""The training data pipeline (albef/data): exact epochs over ranks and workers, equal batch counts, exact
mid-epoch resume, bad-sample handling, shard sources (dir, brace pattern, http, pipe:), official JSON files.

Everything is real: JPEGs made with Pillow, tar shards written by data_prep.shards.ShardWriter, DataLoader worker
processes. Ranks are simulated by building the loader with rank=0/1 and world_size=2 in one process."""

from __future__ import annotations

import collections
import functools
import http.server
import io
import json
import logging
import random
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

import albef  # noqa: F401
from albef.config import ConfigError, from_dict
from albef.data import (
    CLIP_MEAN,
    CLIP_STD,
    DataConfig,
    JsonCaptionDataset,
    build_pretrain_loader,
    normalize_images,
    pretrain_transform,
    shuffle_events,
    worker_batch_counts,
)
from albef.data.shards import Shard, count_samples, expand_dataset, iter_shard
from albef.tokenizer import Tokenizer
from data_prep.shards import ShardWriter, write_manifest

RES = 32


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def jpeg(rng: np.random.Generator, width: int = 48, height: int = 40) -> bytes:
    base = Image.fromarray((rng.random((4, 5, 3)) * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    buf = io.BytesIO()
    base.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def write_dataset(out: Path, sizes: List[int], prefix: str, seed: int = 0) -> List[str]:
    """Shards of the given sizes (data_prep.shards), two captions per image; returns the keys."""
    rng = np.random.default_rng(seed)
    keys = []
    for index, n in enumerate(sizes):
        with ShardWriter(out, index) as writer:
            for _ in range(n):
                key = f"{prefix}{len(keys):04d}"
                writer.write(key, jpeg(rng), [f"A photo, number {len(keys)}!", f"picture {len(keys)}"], {"key": key})
                keys.append(key)
            writer.commit()
    write_manifest(out)
    return keys


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Dict:
    """Seven shards of uneven sizes, 56 samples."""
    out = tmp_path_factory.mktemp("uneven")
    return {"dir": out, "keys": write_dataset(out, [7, 13, 5, 11, 9, 3, 8], "u")}


def cfg_for(shards, **kw) -> DataConfig:
    base = dict(
        shards=[str(s) for s in shards], image_res=RES, batch_size=4, num_workers=2, shuffle_buffer=6, pin_memory=False
    )
    base.update(kw)
    return DataConfig(**base)


def run_epoch(loader, epoch: int = 0) -> List[Dict]:
    loader.set_epoch(epoch)
    return list(loader)


def keys_of(batches) -> List[str]:
    return [k for b in batches for k in b["key"]]


# ---- exact epochs ------------------------------------------------------------------------------------------------
def test_two_ranks_two_workers_see_every_sample_exactly_once(uneven, tok):
    cfg = cfg_for([uneven["dir"]])
    seen = []
    for rank in range(2):
        loader = build_pretrain_loader(cfg, tok, rank=rank, world_size=2, seed=3)
        batches = run_epoch(loader)
        assert len(loader) == len(batches) == 7  # 56 / (2 ranks x 4)
        seen += keys_of(batches)
    assert sorted(seen) == sorted(uneven["keys"])  # every sample once, none twice


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("world,workers,batch", [(2, 2, 5), (3, 1, 3), (2, 3, 2)])
def test_every_rank_yields_the_same_number_of_batches_with_uneven_shards(uneven, tok, world, workers, batch):
    cfg = cfg_for([uneven["dir"]], num_workers=workers, batch_size=batch)
    expected = 56 // (world * batch)
    seen = []
    for rank in range(world):
        loader = build_pretrain_loader(cfg, tok, rank, world, seed=0)
        batches = run_epoch(loader)
        assert len(loader) == len(batches) == expected
        assert all(len(b["key"]) == batch for b in batches)
        seen += keys_of(batches)
    # no repeats; the remainder 56 - R*K*B is dropped, nothing else
    assert len(seen) == len(set(seen)) == world * expected * batch
    assert set(seen) <= set(uneven["keys"])


def test_epochs_reshuffle_deterministically(uneven, tok):
    cfg = cfg_for([uneven["dir"]], num_workers=1)

    def order(seed, epoch):
        return keys_of(run_epoch(build_pretrain_loader(cfg, tok, 0, 1, seed), epoch))

    first = order(0, 0)
    assert order(0, 0) == first  # same (seed, epoch): same order, from a fresh loader
    assert order(0, 1) != first and sorted(order(0, 1)) == sorted(first)
    assert order(1, 0) != first


def test_fewer_shards_than_ranks_times_workers_is_an_error(tmp_path, tok):
    write_dataset(tmp_path, [4, 4, 4], "f")
    with pytest.raises(ValueError, match=r"3 shard\(s\) for 2 rank\(s\) x 2 worker\(s\) = 4 readers"):
        build_pretrain_loader(cfg_for([tmp_path]), tok, 0, 2, seed=0)
    # resampled mode has no such limit
    assert len(build_pretrain_loader(cfg_for([tmp_path], resampled=True), tok, 0, 2, seed=0)) == 1
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_pretrain_loader(cfg_for([tmp_path], batch_size=8, num_workers=1), tok, 0, 2, seed=0)


def test_batch_format(uneven, tok):
    loader = build_pretrain_loader(cfg_for([uneven["dir"]], num_workers=0), tok, 0, 1, seed=0)
    batch = next(iter(loader))
    assert set(batch) == {"image", "input_ids", "attention_mask", "caption", "key"}
    assert batch["image"].shape == (4, RES, RES, 3) and batch["image"].dtype == torch.uint8  # pixels, normalised
    pixels = normalize_images(batch["image"])  # on the training device by the engine
    assert pixels.shape == (4, 3, RES, RES) and pixels.dtype == torch.float32
    lo = ((0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).min()
    hi = ((1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).max()
    assert lo - 1e-5 <= pixels.min() and pixels.max() <= hi + 1e-5
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape and ids.shape[1] <= 25
    assert (ids[:, 0] == tok.cls_token_id).all() and not (ids == tok.sep_token_id).any()  # [CLS], no [SEP]
    for caption, key, row in zip(batch["caption"], batch["key"], ids):
        n = int(key[1:])
        assert caption in (f"a photo number {n}", f"picture {n}")  # one of the two lines, pre_caption'ed
        assert tok.decode(row) == caption
    # the caption is drawn per access: over a few epochs both lines of a sample show up
    captions = collections.defaultdict(set)
    for epoch in range(4):
        for b in run_epoch(loader, epoch):
            for k, c in zip(b["key"], b["caption"]):
                captions[k].add(c)
    assert sum(len(c) == 2 for c in captions.values()) > len(captions) // 2


# ---- resume ------------------------------------------------------------------------------------------------------
def interrupted(cfg, tok, rank, world, stop_after, epoch=0, seed=5):
    """Run ``stop_after`` batches, checkpoint, then finish the epoch in a fresh loader restored from it."""
    loader = build_pretrain_loader(cfg, tok, rank, world, seed)
    loader.set_epoch(epoch)
    first = []
    for batch in loader:
        first.append(batch)
        if len(first) == stop_after:
            state = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON checkpoint
            break
    assert len(json.dumps(state)) < 2000
    resumed = build_pretrain_loader(cfg, tok, rank, world, seed)
    resumed.load_state_dict(state)
    resumed.set_epoch(epoch)  # the engine calls this again on resume: same epoch keeps the position
    return first, list(resumed), resumed


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and x["caption"] == y["caption"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["input_ids"], y["input_ids"])


@pytest.mark.parametrize("stop_after", [3, 4])  # odd: the resumed round-robin starts at worker 1
def test_resume_mid_epoch_continues_exactly(uneven, tok, stop_after):
    cfg = cfg_for([uneven["dir"]])
    full = run_epoch(build_pretrain_loader(cfg, tok, 1, 2, seed=5))
    first, rest, resumed = interrupted(cfg, tok, 1, 2, stop_after)
    assert len(first) + len(rest) == len(full) == 7
    assert_same_batches(first + rest, full)  # same samples, same order, same pixels and captions
    seen = keys_of(first + rest)
    assert len(seen) == len(set(seen))  # nothing repeated
    assert resumed.state_dict()["batch"] == 7
    # the next epoch starts at batch 0 and differs
    assert keys_of(run_epoch(resumed, 1)) != keys_of(full)


def test_resume_reads_only_from_the_shuffle_buffer_window_on(tmp_path, tok):
    """A late resume opens only the shards from the oldest buffered sample on, not the epoch from its start."""
    write_dataset(tmp_path, [4] * 20, "w")
    opened = tmp_path / "opened.log"
    spec = f"pipe:sh -c 'echo $0 >> {opened}; cat $0' {tmp_path}/{{000000..000019}}.tar"
    cfg = cfg_for([spec], manifests=[str(tmp_path / "manifest.json")], num_workers=1, shuffle_buffer=4)
    full = run_epoch(build_pretrain_loader(cfg, tok, 0, 1, seed=0))
    assert len(opened.read_text().split()) == 20  # 20 batches of 4 = every shard once
    loader = build_pretrain_loader(cfg, tok, 0, 1, seed=0)
    for i, _ in enumerate(loader):
        if i == 14:
            state = loader.state_dict()
            break
    opened.write_text("")
    resumed = build_pretrain_loader(cfg, tok, 0, 1, seed=0)
    resumed.load_state_dict(state)
    assert_same_batches(list(resumed), full[15:])
    assert 1 <= len(opened.read_text().split()) <= 8  # the last 5 batches come from the last ~5-7 shards


def test_resume_resampled_mode_with_weights(tmp_path, tok):
    a = write_dataset(tmp_path / "a", [6, 9, 5], "a", seed=1)
    write_dataset(tmp_path / "b", [7, 4], "b", seed=2)
    cfg = cfg_for([tmp_path / "a", tmp_path / "b"], resampled=True, weights=[3.0, 1.0], samples_per_epoch=48)
    full = run_epoch(build_pretrain_loader(cfg, tok, 0, 2, seed=5), epoch=2)
    assert len(full) == 6  # 48 / (2 x 4)
    first, rest, _ = interrupted(cfg, tok, 0, 2, stop_after=3, epoch=2)
    assert_same_batches(first + rest, full)
    assert set(keys_of(full)) & set(a)


def test_resampled_weights_set_the_dataset_mix(tmp_path, tok):
    write_dataset(tmp_path / "a", [5] * 6, "a", seed=1)
    write_dataset(tmp_path / "b", [5] * 6, "b", seed=2)
    cfg = cfg_for(
        [tmp_path / "a", tmp_path / "b"],
        resampled=True,
        weights=[3.0, 1.0],
        samples_per_epoch=600,
        batch_size=10,
        num_workers=1,
        image_res=8,
        shuffle_buffer=0,
    )
    counts = collections.Counter()
    for rank in range(2):
        loader = build_pretrain_loader(cfg, tok, rank, 2, seed=0)
        batches = run_epoch(loader)
        assert len(batches) == len(loader) == 30
        counts.update(k[0] for k in keys_of(batches))
    assert counts["a"] / 600 == pytest.approx(0.75, abs=0.06)  # equal-sized datasets, weights 3:1
    assert keys_of(run_epoch(build_pretrain_loader(cfg, tok, 0, 2, seed=0), 1)) != keys_of(batches)


def test_mid_epoch_state_rejects_changed_data_and_accepts_a_changed_setup(uneven, tmp_path, tok):
    cfg = cfg_for([uneven["dir"]])
    loader = build_pretrain_loader(cfg, tok, 0, 2, seed=5)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    del it
    assert state["batch"] == 1 and state["epoch"] == 0 and state["stats"]["samples"] == 4
    write_dataset(tmp_path, [7, 13, 5, 11, 9, 3, 9], "u")  # one more sample in the last shard
    with pytest.raises(ValueError, match=r"mid-epoch \(epoch 0, batch 1\) but fingerprint"):
        build_pretrain_loader(cfg_for([tmp_path]), tok, 0, 2, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match=r"seed 5 -> 6"):
        build_pretrain_loader(cfg, tok, 0, 2, seed=6).load_state_dict(state)
    other = build_pretrain_loader(cfg_for([uneven["dir"]], num_workers=1), tok, 0, 2, seed=5)
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({"epoch": 0})
    other.load_state_dict(state)  # another number of workers: the rest of the epoch is re-split
    assert other.epoch == 0 and other.batches_this_epoch == 6 and len(other) == 7
    # at an epoch boundary anything may change: the next epoch starts at batch 0
    done = dict(state, batch=state["num_batches"])
    other.load_state_dict(done)
    assert other.epoch == 1 and other.state_dict()["batch"] == 0 and other.batches_this_epoch == 7


def ranks_run(cfg, tok, world, stop_after=None, state=None, seed=5):
    """Every rank of a ``world``-rank job (restored from ``state`` if given) runs ``stop_after`` batches (or to the end
    of the epoch): their keys, and rank 0's state at the stop as it would be saved."""
    keys, saved = [], None
    for rank in range(world):
        loader = build_pretrain_loader(cfg, tok, rank, world, seed)
        if state is not None:
            loader.load_state_dict(state)
            loader.set_epoch(state["epoch"])
        else:
            loader.set_epoch(0)
        for i, batch in enumerate(loader, start=1):
            keys += batch["key"]
            if i == stop_after:
                break
        if rank == 0:
            saved = json.loads(json.dumps(loader.state_dict()))
    return keys, saved


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_a_changed_world_size_re_splits_the_rest_of_the_epoch(uneven, tok, caplog):
    """2 ranks x 2 workers stop after 3 of 7 batches; 1 rank x 2 workers finishes the epoch: together they deliver
    exactly the samples of the uninterrupted 2-rank epoch, each once. Then 2 -> 3 ranks (batch 3, 1 worker) -> 1
    rank, a second change inside the re-split: nothing repeats, and what is lost is only each phase's last partial
    global batch, as the log says."""
    cfg = cfg_for([uneven["dir"]])
    straight, _ = ranks_run(cfg, tok, 2)
    assert sorted(straight) == sorted(uneven["keys"])
    first, state = ranks_run(cfg, tok, 2, stop_after=3)
    assert len(first) == 24 and state["batch"] == 3
    caplog.set_level(logging.WARNING, "albef.data.loader")
    rest, end = ranks_run(cfg, tok, 1, state=state)
    assert "the 32 sample(s) of the epoch not yet delivered are re-split over them, 8 batch(es) per rank" in caplog.text
    assert len(rest) == 32 and sorted(first + rest) == sorted(straight)
    assert end["epoch"] == 0 and end["batch"] == end["num_batches"] == 8 and len(end["phases"]) == 1
    # the same restored state on one rank, interrupted again at the same setup: exact mid-phase resume
    one = cfg_for([uneven["dir"]])
    resumed = build_pretrain_loader(one, tok, 0, 1, seed=5)
    resumed.load_state_dict(state)
    head, _ = [], None
    for batch in resumed:
        head.append(batch)
        if len(head) == 3:
            mid = json.loads(json.dumps(resumed.state_dict()))
            break
    again = build_pretrain_loader(one, tok, 0, 1, seed=5)
    again.load_state_dict(mid)
    assert keys_of(head) + keys_of(list(again)) == rest

    caplog.clear()
    three = cfg_for([uneven["dir"]], num_workers=1, batch_size=3)
    second, state3 = ranks_run(three, tok, 3, stop_after=1, state=state)
    assert "the 32 sample(s)" in caplog.text and "3 batch(es) per rank; the last 5" in caplog.text
    assert len(second) == 9 and len(state3["phases"]) == 1 and state3["phases"][0]["world_size"] == 2
    caplog.clear()
    third, end = ranks_run(cfg_for([uneven["dir"]], num_workers=0), tok, 1, state=state3)
    assert "the 18 sample(s)" in caplog.text and len(third) == 16  # 18 -> 4 batches of 4; 2 dropped
    seen = first + second + third
    assert len(seen) == len(set(seen)) == 49 and set(seen) < set(straight)
    assert [p["world_size"] for p in end["phases"]] == [2, 3]


def test_json_and_resampled_epochs_re_split_on_another_world_size(official_json, tmp_path, tok):
    files, root = official_json["files"], official_json["root"]
    cfg = DataConfig(
        json_files=files, image_root=str(root), image_res=RES, batch_size=3, num_workers=1, pin_memory=False
    )
    straight, _ = ranks_run(cfg, tok, 2)
    first, state = ranks_run(cfg, tok, 2, stop_after=1)
    rest, _ = ranks_run(cfg, tok, 3, state=state)
    assert len(rest) == 18 and sorted(first + rest) == sorted(straight) == sorted(official_json["paths"])
    # resampled: no fixed set of samples, but the epoch's count carries over: 6 of 12 batches of 4 done on 2
    # ranks leave 6 x 8 = 48 samples, 4 batches of 4 on each of 3 ranks
    write_dataset(tmp_path / "a", [6, 9, 5], "a", seed=1)
    res = cfg_for([tmp_path / "a"], resampled=True, samples_per_epoch=96, num_workers=1)
    first, state = ranks_run(res, tok, 2, stop_after=6)
    rest, end = ranks_run(res, tok, 3, state=state)
    assert len(rest) == 48 and end["batch"] == end["num_batches"] == 4


# ---- bad samples -------------------------------------------------------------------------------------------------
def rewrite_shard(path: Path, edit) -> None:
    """Rewrite a data_prep shard's members through ``edit({name: bytes}) -> {name: bytes}`` (same order)."""
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    members = edit(members)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> Dict:
    """Six shards of 6 (36 samples), damaged after data_prep wrote them:
    000000: bad.jpg is not an image; 000001: an empty caption, non-UTF-8 text, a sample without its .jpg;
    000002: truncated inside its 4th sample's image (3 readable); 000003: not a tar at all."""
    out = tmp_path_factory.mktemp("damaged")
    keys = write_dataset(out, [6] * 6, "d")
    ok = set(keys)

    def corrupt_image(m):
        m[f"{keys[1]}.jpg"] = b"\xff\xd8 definitely not a JPEG"
        return m

    def text_problems(m):
        m[f"{keys[6]}.txt"] = b""
        m[f"{keys[7]}.txt"] = b"caf\xe9 \xff\xfe"
        del m[f"{keys[8]}.jpg"]
        return m

    rewrite_shard(out / "000000.tar", corrupt_image)
    rewrite_shard(out / "000001.tar", text_problems)
    with tarfile.open(out / "000002.tar") as tar:
        cut = tar.getmember(f"{keys[15]}.jpg").offset_data + 50
    (out / "000002.tar").write_bytes((out / "000002.tar").read_bytes()[:cut])
    (out / "000003.tar").write_bytes(b"\x00garbage" * 300)
    ok -= {keys[1], keys[6], keys[7], keys[8]} | set(keys[15:18]) | set(keys[18:24])
    return {"dir": out, "keys": keys, "good": ok}


def test_bad_samples_are_skipped_counted_and_batches_stay_full(damaged, tok):
    cfg = cfg_for([damaged["dir"]], batch_size=6, num_workers=2, max_bad_fraction=0.5)
    loader = build_pretrain_loader(cfg, tok, 0, 1, seed=0)
    batches = run_epoch(loader)
    assert len(batches) == len(loader) == 6 and all(len(b["key"]) == 6 for b in batches)
    stats = loader.stats()
    assert stats == {
        "samples": 36,
        "decode_error": 1,
        "missing_caption": 1,
        "bad_text": 1,
        "missing_image": 1,
        "truncated_shard": 3 + 6,
        "skipped": 13,
    }
    seen = collections.Counter(keys_of(batches))
    assert set(seen) == damaged["good"]  # every good sample delivered, no bad one
    assert sum(seen.values()) - len(seen) == 13  # each bad slot filled by a repeat of a good sample
    # resuming keeps the counts (restored, not recounted)
    first, rest, resumed = interrupted(cfg, tok, 0, 1, stop_after=2, seed=0)
    assert keys_of(first + rest) == keys_of(batches)
    assert resumed.stats() == stats


def test_too_many_bad_samples_are_an_error_not_endless_repeats(damaged, uneven, tok, tmp_path):
    """A worker whose bad samples pass data.max_bad_fraction of its epoch stops with a clear error (default 0.1),
    instead of back-filling its batches with repeats: the damaged set has 13 bad of 36."""
    with pytest.raises(RuntimeError, match=r"bad samples of the 36.*data.max_bad_fraction=0.1"):
        run_epoch(build_pretrain_loader(cfg_for([damaged["dir"]], batch_size=6, num_workers=0), tok, 0, 1, seed=0))
    # shards that disappear mid-epoch (deleted after the first batch)
    import shutil

    data = tmp_path / "vanishing"
    shutil.copytree(uneven["dir"], data)
    loader = build_pretrain_loader(cfg_for([data], num_workers=0, shuffle_buffer=0), tok, 0, 1, seed=0)
    loader.set_epoch(0)
    batches = iter(loader)
    next(batches)
    for shard in sorted(data.glob("*.tar"))[2:]:
        shard.unlink()
    with pytest.raises(RuntimeError, match=r"data.max_bad_fraction=0.1"):
        list(batches)


def test_bad_samples_are_logged_with_key_and_shard(damaged, tok, caplog):
    cfg = cfg_for([damaged["dir"]], batch_size=6, num_workers=0, max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="albef.data"):
        run_epoch(build_pretrain_loader(cfg, tok, 0, 1, seed=0))
    text = caplog.text
    keys = damaged["keys"]
    assert f"key={keys[1]} shard={damaged['dir'] / '000000.tar'}: decode_error" in text
    assert f"key={keys[7]} shard={damaged['dir'] / '000001.tar'}: bad_text" in text
    assert f"key={keys[6]} " in text and f"key={keys[8]} " in text
    assert f"{damaged['dir'] / '000002.tar'}: ReadError" in text and "remaining 3 sample position(s)" in text
    assert f"{damaged['dir'] / '000003.tar'}" in text and "remaining 6 sample position(s)" in text


def test_a_worker_without_any_good_sample_raises(tmp_path, tok):
    write_dataset(tmp_path, [4, 4], "z")
    for name in ("000000.tar", "000001.tar"):
        (tmp_path / name).write_bytes(b"not a tar")
    loader = build_pretrain_loader(cfg_for([tmp_path], num_workers=0, max_bad_fraction=1.0), tok, 0, 1, seed=0)
    with pytest.raises(RuntimeError, match="no readable sample"):
        run_epoch(loader)


# ---- sources -----------------------------------------------------------------------------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(uneven):
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(uneven["dir"]))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_directory_brace_pattern_http_and_pipe_sources_read_the_same_epoch(uneven, tok, http_root):
    d = uneven["dir"]
    specs = {
        "dir": dict(shards=[str(d)]),
        "brace": dict(shards=[f"{d}/{{000000..000006}}.tar"]),
        "http": dict(shards=[f"{http_root}/{{000000..000006}}.tar"]),  # manifest.json fetched beside them
        "pipe": dict(shards=[f"pipe:cat {d}/{{000000..000006}}.tar"], manifests=[str(d / "manifest.json")]),
    }
    orders = {}
    for name, spec in specs.items():
        cfg = cfg_for(spec.pop("shards"), num_workers=1, **spec)
        loader = build_pretrain_loader(cfg, tok, 0, 1, seed=2)
        assert len(loader) == 14, name
        orders[name] = keys_of(run_epoch(loader))
    assert orders["brace"] == orders["http"] == orders["pipe"] and sorted(orders["dir"]) == sorted(uneven["keys"])


def test_sizes_are_counted_without_a_manifest_and_datasets_combine(tmp_path, uneven, tok, caplog):
    keys = write_dataset(tmp_path, [5, 7], "n")
    (tmp_path / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="albef.data"):
        shards = expand_dataset(f"{tmp_path}/{{000000..000001}}.tar", 0)
    assert [s.num_samples for s in shards] == [5, 7] and "no manifest" in caplog.text
    assert count_samples(f"pipe:cat {tmp_path}/000001.tar") == 7
    cfg = cfg_for([uneven["dir"], f"{tmp_path}/{{000000..000001}}.tar"], num_workers=1)
    seen = keys_of(run_epoch(build_pretrain_loader(cfg, tok, 0, 1, seed=0)))
    assert sorted(seen) == sorted(uneven["keys"] + keys)  # 68 = 17 batches of 4: both datasets, each once


def test_source_errors_name_the_problem(tmp_path, uneven):
    with pytest.raises(FileNotFoundError, match="directory without manifest.json"):
        expand_dataset(str(tmp_path), 0)
    with pytest.raises(FileNotFoundError, match=r"1 of 8 shards do not exist, e\.g\. .*000007\.tar"):
        expand_dataset(f"{uneven['dir']}/{{000000..000007}}.tar", 2)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "shards": [{"name": "000000.tar"}]}))
    with pytest.raises(ValueError, match=r"manifest .*manifest\.json: shards\[0\]=.*num_samples"):
        expand_dataset(str(tmp_path), 0)


def test_iter_shard_positions_are_stable(uneven):
    path = uneven["dir"] / "000001.tar"
    shard = Shard(str(path), 13, 0)
    all_items = list(iter_shard(shard))
    assert [s.key for s in all_items] == uneven["keys"][7:20]
    assert [s.key for s in iter_shard(shard, skip=9)] == uneven["keys"][16:20]
    assert set(all_items[0].members) == {"jpg", "txt", "json"}
    short = list(iter_shard(Shard(str(path), 15, 0)))  # a stale manifest claiming more: placeholders
    assert [type(s).__name__ for s in short[-3:]] == ["RawSample", "Missing", "Missing"]


def test_samples_are_grouped_as_webdataset_groups_them(tmp_path):
    """The reader is webdataset's expansion and grouping; the header-only count (local shards without a manifest)
    and data_prep's reader follow the same key rule: a key up to the first dot of the file name, extensions
    lower-cased, members without an extension and __meta__ files skipped, a dot in a directory kept in the key."""
    import webdataset as wds

    from albef.data.shards import split_member
    from data_prep.shards import iter_tar_samples

    names = ["a.jpg", "a.TXT", "noext", "__meta__", "__key__.txt", "c.d/e.jpg", "c.d/e.json", ".hidden.jpg"]
    names += ["f.tar.gz", "dir/b.x.jpg", "dir/b.x.txt", "a.json"]  # a.json after b: a new sample with a's key
    path = tmp_path / "000000.tar"
    with tarfile.open(path, "w") as tar:
        for name in names:
            data = name.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = wds.WebDataset(str(path), shardshuffle=False)
    theirs = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}) for s in samples]
    assert [k for k, _ in theirs] == ["a", "__key__", "c.d/e", "f", "dir/b", "a"]
    assert theirs[0][1] == {"jpg": b"a.jpg", "txt": b"a.TXT"} and theirs[3][1] == {"tar.gz": b"f.tar.gz"}
    ours = [(s.key, s.members) for s in iter_shard(Shard(str(path), 6, 0))]
    assert ours == theirs and list(iter_tar_samples(path)) == theirs
    assert count_samples(str(path)) == count_samples(f"pipe:cat {path}") == 6
    assert [split_member(n) for n in names[:5]] == [("a", "jpg"), ("a", "txt"), None, None, ("__key__", "txt")]


def test_positions_agree_with_an_explicit_list():
    from albef.data.loader import Positions

    rng = np.random.default_rng(0)
    for _ in range(200):
        explicit = rng.permutation(60)[: rng.integers(1, 60)]
        explicit = np.concatenate([np.sort(explicit[: len(explicit) // 2]), explicit[len(explicit) // 2 :]])
        runs = Positions.of(explicit)
        assert len(runs) == len(explicit) and list(runs.iter_from(0)) == explicit.tolist()
        lo = int(rng.integers(0, len(explicit)))
        n = int(rng.integers(0, len(explicit) - lo + 1))
        assert list(runs.slice(lo, n).iter_from(0)) == explicit[lo : lo + n].tolist()
        index = np.sort(rng.choice(len(explicit), size=min(5, len(explicit)), replace=False))
        assert runs.at(index).tolist() == explicit[index].tolist()
        both = Positions.concat([runs.slice(0, lo), runs.slice(lo, len(explicit) - lo)])
        assert list(both.iter_from(lo)) == explicit[lo:].tolist()


def test_shuffle_events_are_a_permutation_and_replayable():
    for size in (0, 1, 4, 50):
        events = list(shuffle_events(30, size, random.Random(0)))
        outs = [r for op, r in events if op == 1]
        adds = [r for op, r in events if op == 0]
        assert sorted(outs) == adds == list(range(30))
        if size <= 1:
            assert outs == list(range(30))
        else:
            assert outs != list(range(30))
            assert list(shuffle_events(30, size, random.Random(0))) == events
    assert worker_batch_counts(7, 2) == [4, 3] and worker_batch_counts(2, 3) == [1, 1, 0]


EXIT_SCRIPT = """
import sys
from albef.data import DataConfig, build_pretrain_loader
from albef.data.finetune import MapLoader
from albef.tokenizer import Tokenizer

cfg = DataConfig(shards=[sys.argv[1]], image_res=16, batch_size=4, num_workers=2, shuffle_buffer=6, pin_memory=False)
pretrain = iter(build_pretrain_loader(cfg, Tokenizer(), 0, 1, seed=0))
next(pretrain)


class Numbers:
    def __len__(self):
        return 64

    def load(self, index, rng):
        return {"x": index}


finetune = iter(MapLoader(Numbers(), lambda samples: {"x": [s["x"] for s in samples]}, 4, 0, 1, seed=0, num_workers=2))
next(finetune)
raise RuntimeError("the run fails with both loaders open")
"""


def test_a_program_ending_with_open_loaders_exits(uneven, tmp_path):
    """The workers ignore SIGTERM (SLURM signals belong to the main process), so multiprocessing's exit hook, which
    terminates and joins them, hung a program that failed or broke out of a loop with a loader iterator open."""
    script = tmp_path / "open_loaders.py"
    script.write_text(EXIT_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(uneven["dir"])],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 1 and "the run fails with both loaders open" in proc.stderr, proc.stderr[-2000:]


# ---- official JSON files -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def official_json(tmp_path_factory) -> Dict:
    root = tmp_path_factory.mktemp("json")
    rng = np.random.default_rng(4)
    files, paths = [], []
    for f in range(2):
        ann = []
        for i in range(12):
            path = root / "images" / f"{f}_{i}.jpg"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(jpeg(rng))
            caption = f"File {f}, image {i}." if i % 2 else [f"file {f} image {i} (a)", f"file {f} image {i} (b)"]
            ann.append({"image": str(path) if f == 0 else f"images/{f}_{i}.jpg", "caption": caption})
            paths.append(str(path))
        (root / f"ann{f}.json").write_text(json.dumps(ann))
        files.append(str(root / f"ann{f}.json"))
    return {"root": root, "files": files, "paths": paths}


def test_official_json_dataset_and_loader(official_json, tok):
    files, root = official_json["files"], official_json["root"]
    ds = JsonCaptionDataset(files, pretrain_transform(RES), image_root=str(root))
    assert len(ds) == 24
    sample = ds[0]
    assert sample["image"].shape == (RES, RES, 3) and sample["image"].dtype == np.uint8
    assert sample["caption"] in ("file 0 image 0 a", "file 0 image 0 b") and sample["key"] == official_json["paths"][0]
    assert ds[1]["caption"] == "file 0 image 1"
    cfg = DataConfig(
        json_files=files, image_root=str(root), image_res=RES, batch_size=3, num_workers=2, pin_memory=False
    )
    seen = []
    for rank in range(2):
        loader = build_pretrain_loader(cfg, tok, rank, 2, seed=1)
        batches = run_epoch(loader)
        assert len(batches) == len(loader) == 4
        seen += keys_of(batches)
    assert sorted(seen) == sorted(official_json["paths"])
    first, rest, _ = interrupted(cfg, tok, 1, 2, stop_after=1)
    assert_same_batches(first + rest, run_epoch(build_pretrain_loader(cfg, tok, 1, 2, seed=5)))


def test_official_json_errors_name_file_index_and_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "a.jpg", "caption": "ok"}, {"image": "b.jpg", "caption": []}]))
    with pytest.raises(ValueError, match=r"bad\.json\[1\]: 'caption' must be a string or a non-empty list"):
        JsonCaptionDataset([str(bad)], pretrain_transform(RES))
    bad.write_text(json.dumps({"image": "a.jpg"}))
    with pytest.raises(ValueError, match="expected a JSON list"):
        JsonCaptionDataset([str(bad)], pretrain_transform(RES))


# ---- config ------------------------------------------------------------------------------------------------------
def test_data_config_validation_names_field_and_value():
    assert from_dict(DataConfig, {"shards": ["/x"], "batch_size": 8}).batch_size == 8
    cases = [
        ({"shards": ["/x"], "batch_size": -1}, r"data\.batch_size=-1: must be >= 0"),
        ({"shards": ["/x"], "weights": [1.0]}, r"data\.weights=\[1\.0\]: mixing weights need data\.resampled"),
        ({"shards": ["/x", "/y"], "resampled": True, "weights": [1.0]}, r"one weight per data\.shards entry"),
        ({"shards": ["/x"], "resampled": True, "weights": [0.0]}, r"every weight must be > 0"),
        ({"shards": ["/x"], "json_files": ["/a.json"]}, r"set one of the two, not both"),
        ({"shards": ["/x"], "samples_per_epoch": 100}, r"data\.samples_per_epoch=100: only resampled"),
        ({"shards": ["/x"], "num_workers": -1}, r"data\.num_workers=-1"),
        ({"shards": ["/x"], "shufle_buffer": 3}, r"unknown key"),
    ]
    for data, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            from_dict(DataConfig, data, "train.yaml:data")
    with pytest.raises(ValueError, match=r"data\.batch_size=0: the loader needs a per-rank batch"):
        build_pretrain_loader(DataConfig(shards=["/x"]), None, 0, 1, 0)
    with pytest.raises(ValueError, match="both empty"):
        build_pretrain_loader(DataConfig(batch_size=4), None, 0, 1, 0)


# ---- the fine-tuning tasks' loader (map-style datasets) -----------------------------------------------------------
class _Indices:
    """A map-style dataset whose samples are their own index (and the augmentation draw they got)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def load(self, index: int, rng: random.Random) -> Dict:
        return {"i": index, "draw": rng.random()}


def _map_run(world, batch, stop_after=None, state=None, n=50):
    from albef.data.finetune import MapLoader

    seen, saved = [], None
    for rank in range(world):
        loader = MapLoader(
            _Indices(n),
            lambda s: {"i": [x["i"] for x in s], "draw": [x["draw"] for x in s]},
            batch,
            rank,
            world,
            seed=4,
        )
        if state is not None:
            loader.load_state_dict(state)
        for k, b in enumerate(loader, start=1):
            seen += list(zip(b["i"], b["draw"]))
            if k == stop_after:
                break
        if rank == 0:
            saved = json.loads(json.dumps(loader.state_dict()))
    return seen, saved


def test_map_loader_resumes_exactly_and_re_splits_on_another_world_size(caplog):
    straight, end = _map_run(2, 4)  # 50 samples: 6 batches of 4 per rank, 2 dropped
    assert len(straight) == len({i for i, _ in straight}) == 48 and end["position"] == 6
    first, state = _map_run(2, 4, stop_after=2)
    same, _ = _map_run(2, 4, state=state)
    assert sorted(first + same) == sorted(straight)  # same world: exact, augmentation draws included
    caplog.set_level(logging.WARNING, "albef.data.finetune")
    rest, after = _map_run(3, 2, state=state)  # 32 left -> 5 batches of 2 on each of 3 ranks, 2 dropped
    assert "the 32 sample(s) of the epoch not yet delivered are re-split" in caplog.text and "the last 2" in caplog.text
    assert len(rest) == 30 and len(set(first + rest)) == 46 and set(first + rest) < set(straight)
    assert after["phases"] == [{"world_size": 2, "batch_size": 4, "batches": 2}] and after["position"] == 5
    # a state saved after the epoch's last batch resumes at the next epoch, on any world size
    for world in (2, 1):
        nxt, _ = _map_run(world, 4, stop_after=1, state=end)
        assert {i for i, _ in nxt} and set(nxt).isdisjoint(straight)  # epoch 1's draws, not epoch 0's
