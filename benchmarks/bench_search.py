"""Search latency on a big synthetic library, and the cold start of ``phototag search``.

Fills an SQLite database with N photos x 5 tags (default 200,000 x 5; a tag hierarchy of ~330 tags
with Chinese names on some), then prints p50/p95 latency of typical searches run through
``storage.query.search`` (parse, tag hierarchy, SQL, fetching every row) and the median wall time of
the full ``phototag search`` command as a fresh process. Targets: p95 < 50 ms, cold start < 0.5 s.

    .venv/bin/python benchmarks/bench_search.py [--photos 200000] [--db FILE] [--runs 30]

``--db FILE`` keeps the database (and reuses it when it already has the photos).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, insert, select

from storage.db import read_connection, refresh_statistics
from storage.migrate import open_for_write
from storage.query import parse_query, parse_sort, search
from storage.schema import album_root, photo, photo_tag, tag, tag_parent

TAGS_PER_PHOTO = 5
QUERIES = {
    "single tag (cat + narrower)": ["cat"],
    "single leaf tag (tabby)": ["tabby"],
    "single tag, Chinese (猫)": ["猫"],
    "AND (cat dog)": ["cat", "dog"],
    "NOT (cat ^dog)": ["cat", "^dog"],
    "OR (cat , bird)": ["cat", ",", "bird"],
    "OR (cat , dog)": ["cat", ",", "dog"],
    "NOT + date (^dog date:2023-06..2023-08)": ["^dog", "date:2023-06..2023-08"],
    "date range (date:2023-06..2023-08)": ["date:2023-06..2023-08"],
    "tag+score+date, date- (cat score:0.5.. date:2020..)": ["cat", "score:0.5..", "date:2020..",
                                                            "date-"],
    "score sort (dog score-)": ["dog", "score-"],
    "broad tag (animal), --limit 100": ["animal"],
    "broad tag (animal), all rows": ["animal"],
}
LIMITED = {"broad tag (animal), --limit 100": 100}
REFERENCE = "reference: a fixed pure-Python loop"
REFERENCE_LOOP = 1_000_000  # about 15 ms on the 2-core VM these targets were measured on


def build_tags(rng: random.Random) -> tuple[list[dict], list[dict], list[float]]:
    """~330 tags: 12 top categories, 25 children each, a few grandchildren under some children.
    Returns (tag rows, parent edges, the weight with which each tag is drawn for a photo)."""
    tags: list[dict] = []
    edges: list[dict] = []

    def add(name: str, zh: str | None, parent: int | None) -> int:
        tag_id = len(tags) + 1
        tags.append({"id": tag_id, "name": name, "zh": zh, "from_mapping": True})
        if parent is not None:
            edges.append({"tag_id": tag_id, "parent_id": parent})
        return tag_id

    tops = ["animal", "vehicle", "food", "plant", "building", "landscape", "furniture",
            "clothing", "instrument", "tool", "sport", "device"]
    zh_names = {"animal": "动物", "cat": "猫", "dog": "狗", "tabby": "虎斑猫", "vehicle": "车辆"}
    for top in tops:
        top_id = add(top, zh_names.get(top), None)
        children = ["cat", "dog", "bird", "fish"] if top == "animal" else []
        children += [f"{top}_{i}" for i in range(25 - len(children))]
        for child in children:
            child_id = add(child, zh_names.get(child), top_id)
            if child == "cat":
                grandchildren = ["tabby", "siamese", "persian", "egyptian_cat"]
            elif child == "dog":
                grandchildren = [f"dog_breed_{i}" for i in range(20)]
            elif rng.random() < 0.1:
                grandchildren = [f"{child}_{i}" for i in range(3)]
            else:
                grandchildren = []
            for grandchild in grandchildren:
                add(grandchild, zh_names.get(grandchild), child_id)
    # Zipf-like popularity: a few tags are common, most are rare.
    order = list(range(len(tags)))
    rng.shuffle(order)
    weights = [0.0] * len(tags)
    for rank, index in enumerate(order):
        weights[index] = 1.0 / (rank + 1) ** 0.8
    return tags, edges, weights


def fill(url: str, photos: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    engine = open_for_write(url)
    tags, edges, weights = build_tags(rng)
    now = datetime(2025, 1, 1)
    start = datetime(2005, 1, 1)
    span = (now - start).total_seconds()
    t0 = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(insert(album_root), [{"id": 1, "path": "/srv/photos", "added_at": now}])
        conn.execute(insert(tag), tags)
        conn.execute(insert(tag_parent), edges)
        tag_ids = [t["id"] for t in tags]
        batch = 20_000
        for first in range(1, photos + 1, batch):
            photo_rows, tag_rows = [], []
            for pid in range(first, min(first + batch, photos + 1)):
                taken = (start + timedelta(seconds=rng.random() * span)
                         if rng.random() > 0.03 else None)
                folder = f"{taken:%Y/%m}" if taken else "undated"
                photo_rows.append({
                    "id": pid, "root_id": 1, "relpath": f"{folder}/IMG_{pid:07d}.jpg",
                    "size": 3_000_000, "mtime_ns": 1_700_000_000_000_000_000,
                    "content_hash": f"{pid:064x}", "width": 4000, "height": 3000,
                    "taken_at": taken, "status": "tagged", "attempts": 1,
                    "tagged_at": now, "model": "resnet18", "mapping_version": "1",
                    "indexed_at": now,
                })
                chosen: set[int] = set()
                while len(chosen) < TAGS_PER_PHOTO:
                    chosen.update(rng.choices(tag_ids, weights, k=TAGS_PER_PHOTO - len(chosen)))
                for tag_id in chosen:
                    tag_rows.append({"photo_id": pid, "tag_id": tag_id, "source": "model",
                                     "score": round(rng.random(), 4)})
            conn.execute(insert(photo), photo_rows)
            conn.execute(insert(photo_tag), tag_rows)
    refresh_statistics(engine)  # as `phototag index` does at its end
    engine.dispose()
    print(f"filled {photos:,} photos x {TAGS_PER_PHOTO} tags ({len(tags)} tags) "
          f"in {time.perf_counter() - t0:.1f} s")


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    k = max(0, min(len(values) - 1, round(p / 100 * (len(values) - 1))))
    return values[k]


def bench_queries(url: str, runs: int) -> list[tuple[str, float, float, float, int]]:
    """(label, wall p50, wall p95, CPU p50, rows) per query; times in ms.

    The queries take turns (one run of each, then the next round), so that a slow spell of a
    shared machine spreads over all of them instead of landing on one query's p95. A fixed
    pure-Python loop takes its turn too ("reference"): its p95 / p50 is the machine's own noise.
    CPU time is printed too because on a busy machine the wall time also counts waiting for a
    core. The cyclic garbage collector is off while a query runs, as it is in ``phototag search``
    (daemon/cli.py, READ_ONLY_COMMANDS); otherwise its pauses over the thousands of result
    objects would dominate the p95 of the bigger results.
    """
    from storage.db import make_engine

    engine = make_engine(url)
    path_sort = [parse_sort("path")]

    def run_query(label: str) -> int:
        with read_connection(engine) as connection:
            query = parse_query(QUERIES[label])
            hits = search(connection, query, sort=[] if query.sort else path_sort,
                          limit=LIMITED.get(label),
                          details=False)  # what `phototag search` does for its path list
        return len(hits)

    def reference() -> int:
        sum(range(REFERENCE_LOOP))
        return 0

    tasks: dict[str, Callable[[], int]] = {REFERENCE: reference}
    tasks.update({label: functools.partial(run_query, label) for label in QUERIES})
    wall: dict[str, list[float]] = {label: [] for label in tasks}
    cpu: dict[str, list[float]] = {label: [] for label in tasks}
    counts: dict[str, int] = {}
    gc.collect()
    gc.disable()
    try:
        for i in range(runs + 2):
            for label, task in tasks.items():
                t0, c0 = time.perf_counter(), time.process_time()
                counts[label] = task()
                if i >= 2:  # the first two rounds warm the page cache and the connection pool
                    wall[label].append((time.perf_counter() - t0) * 1000)
                    cpu[label].append((time.process_time() - c0) * 1000)
    finally:
        gc.enable()
        engine.dispose()
    return [(label, statistics.median(wall[label]), percentile(wall[label], 95),
             statistics.median(cpu[label]), counts[label]) for label in tasks]


def print_queries(url: str, runs: int) -> None:
    print(f"  {'query':<54}{'p50':>8}{'p95':>8}{'cpu p50':>9}{'rows':>9}")
    for label, p50, p95, cpu, count in bench_queries(url, runs):
        if label == REFERENCE:
            print(f"  {label:<54}{p50:8.1f}{p95:8.1f}{cpu:9.1f}{'':>9}  (p95/p50 {p95 / p50:.2f})")
            continue
        flag = "" if p95 < 50 else "  (p95 over 50 ms)"
        print(f"  {label:<54}{p50:8.1f}{p95:8.1f}{cpu:9.1f}{count:9,}{flag}")


def cold_start(url: str, runs: int) -> dict[str, float]:
    exe = shutil.which("phototag", path=os.path.dirname(sys.executable)) or "phototag"
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "phototag --version": [exe, "--version"],
        "phototag --help": [exe, "--help"],
        "phototag search cat --limit 20": [exe, "--db", url, "search", "cat", "--limit", "20"],
        "phototag search cat (all rows)": [exe, "--db", url, "search", "cat"],
    }
    # As installed Python runs: with bytecode caches. (Some environments set
    # PYTHONDONTWRITEBYTECODE, which makes every start compile phototag's own modules again.)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    medians = {}
    for label, command in commands.items():
        timings = []
        for run in range(runs + 1):  # the first run writes the bytecode caches and is not timed
            t0 = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=env)
            if run == 0:
                continue
            timings.append(time.perf_counter() - t0)
        medians[label] = statistics.median(timings)
    return medians


def import_times(url: str) -> list[tuple[str, float]]:
    """Cumulative import time (ms) of the heavy modules a search loads, from -X importtime."""
    code = ("from daemon.cli import main\n"
            f"main(['--db', {url!r}, 'search', 'cat', '--limit', '1'], standalone_mode=False)")
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True,
                         text=True, check=True).stderr
    wanted = ("click", "sqlalchemy", "sqlalchemy.orm", "alembic", "storage.models",
              "storage.schema", "storage.migrate", "storage.query", "daemon.config", "daemon.cmd_search")
    found = {}
    for line in err.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)", line)
        if m and m.group(2) in wanted:
            found[m.group(2)] = int(m.group(1)) / 1000
    return sorted(found.items(), key=lambda kv: -kv[1])


def cpu_calibration() -> float:
    """Seconds of a fixed pure-Python loop, to compare machines (a 2020s desktop: ~0.12 s)."""
    t0 = time.perf_counter()
    sum(range(10_000_000))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=200_000)
    parser.add_argument("--db", type=Path, help="keep the database here (reused if filled)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per query")
    parser.add_argument("--cold-runs", type=int, default=7, help="process starts per command")
    args = parser.parse_args()

    tmp = None
    if args.db is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_search_")
        args.db = Path(tmp.name) / "bench.db"
    url = f"sqlite:///{args.db.absolute()}"
    existing = 0
    if args.db.exists():
        from storage.db import make_engine

        engine = make_engine(url)
        with engine.connect() as conn:
            existing = conn.execute(select(func.count()).select_from(photo)).scalar()
        engine.dispose()
    if existing != args.photos:
        if args.db.exists():
            args.db.unlink()
        fill(url, args.photos)
    else:
        open_for_write(url).dispose()  # brought up to this phototag's schema, as a write would
        print(f"reusing {args.db} ({existing:,} photos)")

    print(f"cpu calibration (sum(range(1e7))): {cpu_calibration():.2f} s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"\nquery latency over {args.runs} rounds of every query in turn (ms; includes parse, "
          "tag hierarchy, SQL, fetching all rows):")
    print_queries(url, args.runs)
    print(f"\ncold start, median of {args.cold_runs} process runs:")
    for label, seconds in cold_start(url, args.cold_runs).items():
        print(f"  {label:<54}{seconds:8.3f} s")
    print("\nimport time of a search (-X importtime, cumulative ms):")
    for module, ms in import_times(url):
        print(f"  {module:<54}{ms:8.1f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
