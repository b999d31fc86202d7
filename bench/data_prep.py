"""Benchmark: data_prep.download vs img2dataset, same loopback server, same URL list, same resize/encode settings.

    .venv/bin/python bench/data_prep.py                      # 4000 images, 2 rounds
    .venv/bin/python bench/data_prep.py --images 1000 --rounds 1

On first use it creates ``bench/.venv-img2dataset`` (``python -m venv`` + ``pip install img2dataset==1.47.0``) so
img2dataset's pinned dependencies stay out of the main venv. Then it makes ``--images`` distinct JPEG/PNG files from
real photos (scikit-image's sample data; random crops, 320-1024 px long side, like web images), serves them from one
``data_prep.loopback`` server on 127.0.0.1, writes one parquet URL list, and runs each tool as a fresh process,
alternating, ``--rounds`` times, with the same settings: webdataset output, keep_ratio to a 256 px shortest side,
JPEG quality 95, sha256, shard size, threads per process, timeout 10 s, no retries (img2dataset's EXIF extraction is
off: we do not extract EXIF). img2dataset runs with ``processes_count`` 1 and one per CPU (its documented setting);
its faster median is the baseline. data_prep runs with its default process count. Samples/s = samples written /
wall time of the whole command (start-up included); CPU ms/sample (user + sys of the command and its children) is
printed too, being less sensitive to other load on the machine. The output check compares image sizes.
``--with-urllib3`` adds data_prep over urllib3 connection pools (``bench/urllib3_fetcher.py``) and prints its ratio
to data_prep's own http.client transport.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.loopback import LoopbackServer, Route, real_photos  # noqa: E402

I2D_VENV = REPO / "bench" / ".venv-img2dataset"
I2D_SPEC = "img2dataset==1.47.0"


def ensure_img2dataset(spec: str) -> Path:
    exe = I2D_VENV / "bin" / "img2dataset"
    if not exe.exists():
        print(f"creating {I2D_VENV} with {spec} (first use only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(I2D_VENV)], check=True)
        subprocess.run([str(I2D_VENV / "bin" / "pip"), "install", "-q", spec], check=True)
    return exe


_PHOTOS = []


def _load_photos() -> None:
    _PHOTOS.extend(
        Image.open(io.BytesIO(data)).convert("RGB")
        for name, data in real_photos().items()
        if name not in ("camera.png", "brick.png")
    )


def make_image(index: int) -> bytes:
    """One web-like image: a random crop of a real photo, 320-1024 px long side, JPEG (q 80-95) or PNG."""
    rng = np.random.default_rng(index)
    im = _PHOTOS[index % len(_PHOTOS)]
    w, h = im.size
    cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = im.crop((left, top, left + cw, top + ch))
    scale = rng.uniform(320, 1024) / max(cw, ch)
    im = im.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    if index % 10 == 9:
        im.save(out, "PNG")
    else:
        im.save(out, "JPEG", quality=int(rng.integers(80, 96)))
    return out.getvalue()


def make_images(count: int):
    with ProcessPoolExecutor(len(os.sched_getaffinity(0)), initializer=_load_photos) as pool:
        return list(pool.map(make_image, range(count), chunksize=64))


def write_list(path: Path, server: LoopbackServer, count: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = [f"/img/{i}.{'png' if i % 10 == 9 else 'jpg'}" for i in range(count)]
    pq.write_table(
        pa.table({"url": [server.url(n) for n in names], "caption": [f"a web photo number {i}" for i in range(count)]}),
        path,
    )


def command(tool: str, processes: Optional[int], url_list: Path, out: Path, a: argparse.Namespace, i2d_exe: Path):
    if tool == "img2dataset":
        return [
            str(i2d_exe),
            "--url_list",
            str(url_list),
            "--input_format",
            "parquet",
            "--url_col",
            "url",
            "--caption_col",
            "caption",
            "--output_format",
            "webdataset",
            "--output_folder",
            str(out),
            "--processes_count",
            str(processes),
            "--thread_count",
            str(a.threads),
            "--image_size",
            "256",
            "--resize_mode",
            "keep_ratio",
            "--resize_only_if_bigger",
            "False",
            "--encode_format",
            "jpg",
            "--encode_quality",
            "95",
            "--number_sample_per_shard",
            str(a.shard_size),
            "--timeout",
            "10",
            "--retries",
            "0",
            "--extract_exif",
            "False",
            "--compute_hash",
            "sha256",
            "--enable_wandb",
            "False",
            "--distributor",
            "multiprocessing",
        ]
    entry = (
        [str(REPO / "bench" / "urllib3_fetcher.py")] if tool == "data_prep_urllib3" else ["-m", "data_prep.download"]
    )
    return [
        sys.executable,
        *entry,
        str(url_list),
        "--output",
        str(out),
        "--allow-network",
        "127.0.0.0/8",
        *(["--processes", str(processes)] if processes else []),
        "--threads",
        str(a.threads),
        "--image-size",
        "256",
        "--resize-mode",
        "keep_ratio",
        "--resize-side",
        "shortest",
        "--quality",
        "95",
        "--shard-size",
        str(a.shard_size),
        "--timeout",
        "10",
        "--retries",
        "0",
    ]


def image_sizes(out: Path):
    """Sorted (width, height) of every JPEG written, and the sample count."""
    sizes = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            for member in t:
                if member.name.endswith(".jpg"):
                    sizes.append(Image.open(t.extractfile(member)).size)
    return sorted(sizes)


def run_once(label: str, tool: str, processes: Optional[int], url_list: Path, a, i2d_exe: Path, round_: int):
    out = url_list.parent / f"{label.replace(' ', '_')}-{round_}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    start, cpu_start = time.monotonic(), _children_cpu()
    proc = subprocess.run(
        command(tool, processes, url_list, out, a, i2d_exe), cwd=REPO, env=env, capture_output=True, text=True
    )
    seconds, cpu = time.monotonic() - start, _children_cpu() - cpu_start
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    sizes = image_sizes(out)
    shutil.rmtree(out)
    print(
        f"  round {round_} {label:30s} {len(sizes):6d} samples in {seconds:6.1f}s = {len(sizes) / seconds:7.1f} "
        f"samples/s, {1000 * cpu / max(len(sizes), 1):5.1f} CPU ms/sample",
        flush=True,
    )
    return len(sizes) / seconds, 1000 * cpu / max(len(sizes), 1), sizes


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children and their waited-for children
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=32, help="threads per process, both tools")
    p.add_argument(
        "--img2dataset-processes",
        default=f"1,{cores}",
        help="processes_count values tried for img2dataset; its best median is the baseline",
    )
    p.add_argument("--data-prep-processes", type=int, default=None, help="default: data_prep's own default")
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--img2dataset-spec", default=I2D_SPEC)
    p.add_argument(
        "--with-urllib3",
        action="store_true",
        help="also run data_prep over urllib3 connection pools (bench/urllib3_fetcher.py), to see what "
        "the library would cost or gain against data_prep's http.client transport",
    )
    a = p.parse_args()

    i2d_exe = ensure_img2dataset(a.img2dataset_spec)
    t = time.monotonic()
    images = make_images(a.images)
    print(
        f"made {len(images)} images ({sum(map(len, images)) / len(images) / 1024:.0f} KiB mean) from real photos "
        f"in {time.monotonic() - t:.1f}s",
        flush=True,
    )
    routes = {
        f"/img/{i}.{'png' if i % 10 == 9 else 'jpg'}": Route(
            data, content_type="image/png" if i % 10 == 9 else "image/jpeg"
        )
        for i, data in enumerate(images)
    }
    configs = [
        (f"img2dataset processes={n}", "img2dataset", n)
        for n in sorted({int(x) for x in a.img2dataset_processes.split(",")})
    ]
    if a.with_urllib3:
        configs.append(("data_prep over urllib3", "data_prep_urllib3", a.data_prep_processes))
    configs.append((f"data_prep processes={a.data_prep_processes or 'default'}", "data_prep", a.data_prep_processes))
    rates, cpu, sizes = ({label: [] for label, _, _ in configs} for _ in range(3))
    with tempfile.TemporaryDirectory(prefix="bench-data-prep-") as tmp, LoopbackServer(routes) as server:
        url_list = Path(tmp) / "urls.parquet"
        write_list(url_list, server, a.images)
        print(
            f"settings: {a.images} URLs, keep_ratio shortest side 256, JPEG q95, sha256, shard size {a.shard_size}, "
            f"{a.threads} threads per process, timeout 10 s, 0 retries; {cores} CPUs, load {os.getloadavg()[0]:.1f}"
        )
        for round_ in range(a.rounds):
            for label, tool, processes in configs:
                rate, cpu_ms, sizes[label] = run_once(label, tool, processes, url_list, a, i2d_exe, round_)
                rates[label].append(rate)
                cpu[label].append(cpu_ms)
    median = {label: statistics.median(v) for label, v in rates.items()}
    ours_label = configs[-1][0]
    base_label = max((c[0] for c in configs if c[1] == "img2dataset"), key=median.get)
    ours, theirs = median[ours_label], median[base_label]
    same = sum(abs(x[0] - y[0]) <= 1 and abs(x[1] - y[1]) <= 1 for x, y in zip(sizes[ours_label], sizes[base_label]))
    print(
        f"output check: {len(sizes[ours_label])} vs {len(sizes[base_label])} samples; {same} image sizes agree "
        f"within 1 px"
    )
    print(
        json.dumps(
            {
                "data_prep_samples_per_s": round(ours, 1),
                "img2dataset_samples_per_s": round(theirs, 1),
                "img2dataset_config": base_label,
                "ratio": round(ours / theirs, 2),
                "data_prep_cpu_ms_per_sample": round(statistics.median(cpu[ours_label]), 2),
                "img2dataset_cpu_ms_per_sample": round(statistics.median(cpu[base_label]), 2),
            }
        )
    )
    print(
        f"RESULT: data_prep {ours:.1f} samples/s vs img2dataset {theirs:.1f} samples/s ({base_label}, its best) "
        f"-> {ours / theirs:.2f}x"
    )
    if a.with_urllib3:
        u3 = median["data_prep over urllib3"]
        print(
            f"RESULT: data_prep over urllib3 {u3:.1f} samples/s "
            f"({statistics.median(cpu['data_prep over urllib3']):.2f} CPU ms/sample) vs over http.client "
            f"{ours:.1f} ({statistics.median(cpu[ours_label]):.2f}) -> {u3 / ours:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
