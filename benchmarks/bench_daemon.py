"""The daemon against `phototag index` on the same photos: throughput, memory, idle CPU.

    python benchmarks/bench_daemon.py [FOLDER] [--count 1000] [--size 2016x1512] [--weights FILE]
                                      [--idle-seconds 60]

1. ``phototag index`` tags the photos in a fresh database (its own summary gives photos/s for
   the tagging phase; the wall time includes loading the model).
2. ``phototag daemon`` is started on an album holding one photo and left to settle; then the
   photos are copied into the album (as a user or a sync tool would), and the time from the first
   copy to the last photo tagged gives the daemon's photos/s (copying overlaps tagging; the
   default stability delay and batch delay are included, as in real use).
3. The daemon's peak RSS (VmHWM) and its CPU use over ``--idle-seconds`` of idling afterwards.

Both use the default model settings (ResNet-18, batch 16, threads chosen for the cores) and random
weights unless ``--weights`` names a file (speed does not depend on the weights). Without FOLDER,
deterministic JPEGs are generated once into the cache by photos.py (3 MP by default: "--size
4032x3024" for 12 MP phone photos); ``--distinct`` of them, the rest are byte-level variants. Targets: daemon within 10% of index, RSS < 500 MB, idle CPU
< 1%.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from photos import folder_photos, generate_photos

PHOTOTAG = Path(sys.executable).parent / "phototag"


def random_weights(path: Path) -> Path:
    import torch
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def jpeg_variant(data: bytes, number: int) -> bytes:
    """The same JPEG with a comment segment naming ``number`` after SOI: other bytes (another
    content hash, so not taken for a moved photo) but exactly the same decoding work."""
    comment = f"phototag benchmark copy {number}".encode()
    return data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]


def make_set(bases: list[Path], count: int, dest: Path) -> list[Path]:
    """``count`` distinct JPEGs in ``dest`` made from ``bases`` (cycled, made unique)."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        base = bases[i % len(bases)]
        path = dest / f"IMG_{i:05d}{base.suffix.lower()}"
        data = base.read_bytes()
        if i >= len(bases) and base.suffix.lower() in (".jpg", ".jpeg"):
            data = jpeg_variant(data, i)
        path.write_bytes(data)
        paths.append(path)
    return paths


def place(photos: list[Path], dest: Path) -> None:
    """Put the photos in ``dest`` (hard links where possible: fast, no extra disk)."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in photos:
        target = dest / src.name
        try:
            os.link(src, target)
        except OSError:
            shutil.copy2(src, target)


def tagged_count(db: Path) -> int:
    try:
        connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    except sqlite3.OperationalError:
        return 0
    try:
        return connection.execute("select count(*) from photo where status != 'pending'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        connection.close()


def proc_status(pid: int, key: str) -> int:
    """A /proc/PID/status value in bytes (VmHWM: peak RSS, VmRSS: current)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run_index(work: Path, config: Path, photos: list[Path]) -> tuple[float, float, str]:
    album = work / "index-album"
    place(photos, album)
    started = time.monotonic()
    result = subprocess.run([str(PHOTOTAG), "--config", str(config), "--db", str(work / "index.db"),
                             "index", str(album)], capture_output=True, text=True)
    wall = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"phototag index failed:\n{result.stderr}")
    line = result.stdout.strip().splitlines()[-1]
    match = re.search(r"tagged in ([\d.]+) s, ([\d.]+) photos/s", line)
    rate = float(match.group(2)) if match else len(photos) / wall
    return rate, wall, line


def run_daemon(work: Path, config: Path, photos: list[Path], idle_seconds: float) -> dict:
    album = work / "daemon-album"
    album.mkdir()
    shutil.copy2(photos[0], album / "seed.jpg")  # an empty album root counts as not mounted
    db = work / "daemon.db"
    log = open(work / "daemon.log", "wb")
    proc = subprocess.Popen([str(PHOTOTAG), "--config", str(config), "--db", str(db), "daemon",
                             "--album", str(album)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while tagged_count(db) < 1:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("the daemon did not start:\n" + (work / "daemon.log").read_text())
            time.sleep(0.2)
        time.sleep(3)  # let the start-up work settle
        rss_before = proc_status(proc.pid, "VmRSS")

        total = len(photos) + 1
        started = time.monotonic()
        for src in photos:
            shutil.copyfile(src, album / src.name)
        copied = time.monotonic() - started
        while tagged_count(db) < total:
            if proc.poll() is not None:
                sys.exit("the daemon died:\n" + (work / "daemon.log").read_text())
            time.sleep(0.05)
        elapsed = time.monotonic() - started

        time.sleep(5)  # the last keyword writes, log lines, and the like
        cpu_start, idle_start = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(idle_seconds)
        idle_cpu = (cpu_seconds(proc.pid) - cpu_start) / (time.monotonic() - idle_start)
        peak = proc_status(proc.pid, "VmHWM")
        rss_idle = proc_status(proc.pid, "VmRSS")
        anon_idle = proc_status(proc.pid, "RssAnon")
        with open(f"/proc/{proc.pid}/maps") as f:
            torch_loaded = "libtorch" in f.read()
    finally:
        proc.terminate()
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed"
        log.close()
    batches = (work / "daemon.log").read_text().count("batch: ")
    return dict(rate=len(photos) / elapsed, elapsed=elapsed, copied=copied, peak=peak,
                rss_before=rss_before, rss_idle=rss_idle, anon_idle=anon_idle, idle_cpu=idle_cpu,
                exit=code, batches=batches, torch_loaded=torch_loaded)


def torch_floor() -> tuple[int, int, str]:
    """RSS and its anonymous part of a process that only imports torch: what no daemon can
    go below with this torch build (a CUDA build maps hundreds of MB of CUDA libraries)."""
    code = ("import torch\nfor l in open('/proc/self/status'):\n"
            "    l.startswith(('VmRSS', 'RssAnon')) and print(int(l.split()[1]) * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    import torch

    return int(out[0]), int(out[1]), torch.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, help="photos to use (default: generated)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--distinct", type=int, default=100,
                        help="different images among them (generated ones are slow to make); the "
                             "others are byte-level variants that decode the same")
    parser.add_argument("--size", default="2016x1512", help="generated photos' size (WxH)")
    parser.add_argument("--weights", type=Path, help="ResNet-18 weights (default: random)")
    parser.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                        help="[model] runtime; with onnxruntime the index run prepares the ONNX "
                             "model in the cache and the daemon then runs without torch")
    parser.add_argument("--precision", default="fp32", help="[model] precision")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    if args.folder:
        bases = folder_photos(args.folder, min(args.count, args.distinct))
    else:
        width, height = (int(v) for v in args.size.lower().split("x"))
        bases = generate_photos(min(args.count, args.distinct), size=(width, height),
                                progress=False)
    work = Path(tempfile.mkdtemp(prefix="phototag-bench-daemon-"))
    try:
        photos = make_set(bases, args.count, work / "photos")
        weights = args.weights or random_weights(work / "resnet18-random.pth")
        config = work / "config.toml"
        config.write_text(f'[model]\nweights = "{weights}"\nruntime = "{args.runtime}"\n'
                          f'precision = "{args.precision}"\ncache_dir = "{work / "cache"}"\n')
        size_mb = sum(p.stat().st_size for p in photos) / len(photos) / 1e6
        print(f"{len(photos)} photos, {size_mb:.1f} MB each on average, {os.cpu_count()} cores; "
              f"runtime {args.runtime}, precision {args.precision}")

        index_rate, index_wall, line = run_index(work, config, photos)
        print(f"phototag index : {index_rate:6.1f} photos/s while tagging "
              f"({index_wall:.1f} s wall with model load) - {line}")
        d = run_daemon(work, config, photos, args.idle_seconds)
        ratio = d["rate"] / index_rate
        print(f"phototag daemon: {d['rate']:6.1f} photos/s from first copy to last tagged "
              f"({d['elapsed']:.1f} s; copying took {d['copied']:.1f} s; {d['batches']} batch lines)"
              f" = {ratio:.0%} of index")
        floor_rss, floor_anon, version = torch_floor()
        print(f"daemon RSS     : peak {d['peak'] / 2**20:.0f} MB, {d['rss_before'] / 2**20:.0f} MB "
              f"idle before the drop, {d['rss_idle'] / 2**20:.0f} MB idle after "
              f"({d['anon_idle'] / 2**20:.0f} MB of it anonymous); torch loaded in the daemon: "
              f"{'yes' if d['torch_loaded'] else 'no'}")
        print(f"torch alone    : {floor_rss / 2**20:.0f} MB RSS after `import torch` "
              f"({floor_anon / 2**20:.0f} MB anonymous), torch {version}")
        print(f"daemon idle CPU: {d['idle_cpu']:.2%} of one core over {args.idle_seconds:.0f} s")
        print(f"daemon exit    : {d['exit']} after SIGTERM")
        ok = ratio >= 0.9 and d["peak"] < 500 * 2**20 and d["idle_cpu"] < 0.01
        print("targets (>= 90% of index, RSS < 500 MB, idle CPU < 1%):", "met" if ok else "MISSED")
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
