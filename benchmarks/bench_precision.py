"""Issue 6's throughput target, checked with ``phototag bench`` in one go.

    python benchmarks/bench_precision.py --real DIR [--photos DIR] [--calibration DIR] [--runs N]

1. Throughput: ``phototag bench [--photos DIR] --naive`` on 12 MP JPEGs (default: the generated
   ones) for EfficientNet-Lite0 and ResNet-18 at fp32 and int8 on torch and ONNX Runtime, ``--runs``
   times (other processes share the CPU: the median run per row is reported).
2. Agreement: the same combinations for EfficientNet-Lite0 (real weights) on the real photos in
   ``--real`` (e.g. ImageNet validation samples), top-1 against its fp32 torch run.

int8 is calibrated on ``--calibration`` (default: the real photos; pass a disjoint folder for an
unbiased figure). Prints both tables and the target: >= 45 images/s, >= 9x the naive pipeline, >= 98%
top-1 agreement with fp32 on real photos, for the best combination.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from daemon.cmd_bench import format_table

TARGET_RATE, TARGET_RATIO, TARGET_AGREEMENT = 45.0, 9.0, 0.98


def run_bench(args: list[str]) -> dict:
    command = [sys.executable, "-c", "from daemon.cli import main; main(prog_name='phototag')",
               "bench", *args, "--json"]
    done = subprocess.run(command, capture_output=True, text=True)
    if not done.stdout.strip():
        sys.exit(f"phototag bench failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def key(row: dict) -> tuple[str, str, str]:
    return row["model"], row.get("requested", row["precision"]), row.get("requested_runtime", row["runtime"])


def median_report(reports: list[dict]) -> dict:
    """The first report with each row replaced by the run with the median images/s."""
    merged = dict(reports[0])
    rows = []
    for row in reports[0]["rows"]:
        runs = [r for report in reports for r in report["rows"] if key(r) == key(row) and not r.get("error")]
        if not runs:
            rows.append(row)
            continue
        runs.sort(key=lambda r: r["images_per_s"])
        median = dict(runs[len(runs) // 2])
        median["all_images_per_s"] = [round(r["images_per_s"], 1) for r in runs]
        rows.append(median)
    merged["rows"] = rows
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path, required=True, help="folder of real photos (agreement)")
    parser.add_argument("--photos", type=Path, help="folder of 12 MP JPEGs (default: generated)")
    parser.add_argument("--calibration", type=Path, help="folder to calibrate int8 on")
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    calibration = ["--calibration", str(args.calibration or args.real)]
    combos = ["--precisions", "fp32,int8", "--runtimes", "torch,onnxruntime"]

    timing = [run_bench([*([str(args.photos)] if args.photos else []), "--models",
                         "efficientnet_lite0,resnet18", *combos, "--naive", "--count",
                         str(args.count), *calibration]) for _ in range(args.runs)]
    timing = median_report(timing)
    print("== throughput (median of", args.runs, "runs per row) ==")
    print(format_table(timing))
    for row in timing["rows"]:
        print(f"  {row['model']} {row['precision']} {row['runtime']}: runs {row.get('all_images_per_s')}")

    real = run_bench([str(args.real), "--models", "efficientnet_lite0", *combos, "--count", "1000",
                      *calibration])
    print("\n== agreement on real photos ==")
    print(format_table(real))

    agreement = {(r["model"], r["precision"], r["runtime"]): r["agreement"] for r in real["rows"]}
    naive = {r["model"]: r["images_per_s"] for r in timing["rows"] if r["precision"] == "naive"}
    print("\n== target: >= 45 img/s, >= 9x naive, >= 98% agreement (EfficientNet-Lite0, real photos) ==")
    for row in timing["rows"]:
        if row["model"] != "efficientnet_lite0" or row["precision"] == "naive" or row.get("error"):
            continue
        rate = row["images_per_s"]
        ratio = rate / naive[row["model"]]
        agree = agreement.get((row["model"], row["precision"], row["runtime"]))
        verdict = rate >= TARGET_RATE and ratio >= TARGET_RATIO and (agree or 0) >= TARGET_AGREEMENT
        print(f"  {row['precision']:<5} {row['runtime']:<12} {rate:5.1f} img/s  {ratio:4.1f}x naive  "
              f"agreement {agree if agree is None else format(agree, '.1%')}  -> "
              f"{'meets' if verdict else 'misses'} the target")


if __name__ == "__main__":
    main()
