"""``phototag bench [FOLDER]``: measure which model, precision and runtime to run on this machine.

For each model x precision x runtime, the real tagger (decode threads feeding batched inference)
tags the photos in a fresh child process, so that each combination's peak RSS is its own and no
thread settings leak from one run to the next. Reported: end-to-end images/s (after a warm-up
batch), milliseconds per image and stage, peak RSS, and the top-1 agreement with the same model's
fp32 torch run on the same photos (which is always run, as the reference). A model whose weights
are not at hand is timed with random weights and marked so; its agreement is not shown.

Without FOLDER, deterministic 12 MP JPEGs are generated once into the cache (tagger.sample_photos);
their content means nothing to a classifier, so measure agreement on your own photos (FOLDER).
int8 is calibrated on ``--calibration DIR`` (default: the benchmarked photos). Prepared models are
cached under ``<cache>/bench/``, apart from the ones the daemon uses, so that a benchmark never
leaves a model calibrated on sample photos behind for tagging.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click

from daemon.cli import EX_USAGE, App, fail, pass_app

DEFAULT_PRECISIONS = ("fp32", "bf16", "int8")
DEFAULT_RUNTIMES = ("torch", "onnxruntime")
PHOTO_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".tif", ".tiff", ".bmp", ".gif"}


def _split(values: tuple[str, ...]) -> list[str]:
    """``--models a,b --models c`` -> [a, b, c] (order kept, duplicates dropped)."""
    seen: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if item and item not in seen:
                seen.append(item)
    return seen


def folder_photos(folder: Path, count: int | None) -> list[Path]:
    """Image files directly in ``folder``, sorted by name, at most ``count``."""
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_EXTENSIONS)
    return paths[:count] if count else paths


@click.command()
@click.argument("folder", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--models", "models", multiple=True, metavar="NAME[,NAME...]",
              help="Models to measure (default: all registered).")
@click.option("--precisions", "precisions", multiple=True, metavar="P[,P...]",
              help="fp32, bf16, int8, auto (default: fp32,bf16,int8).")
@click.option("--runtimes", "runtimes", multiple=True, metavar="R[,R...]",
              help="torch, onnxruntime (default: both, if onnxruntime is installed).")
@click.option("--count", type=click.IntRange(1), default=48, show_default=True,
              help="Photos to tag per combination.")
@click.option("--calibration", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of photos to calibrate int8 on (default: the benchmarked photos).")
@click.option("--naive", is_flag=True,
              help="Also time the naive pipeline per model (full decode, torchvision transforms, batch 1).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@pass_app
def bench(app: App, folder: Path | None, models: tuple[str, ...], precisions: tuple[str, ...],
          runtimes: tuple[str, ...], count: int, calibration: Path | None, naive: bool,
          as_json: bool) -> None:
    """Time every model x precision x runtime on FOLDER's photos (default: generated 12 MP JPEGs)."""
    from daemon.config import cache_dir
    from tagger.backbones import BACKBONES
    from tagger.onnx_runtime import missing_packages
    from tagger.precision import PRECISIONS, RUNTIMES

    config = app.config
    model_names = _split(models) or list(BACKBONES)
    for name in model_names:
        if name not in BACKBONES:
            fail(f"unknown model {name!r}; valid models: {', '.join(BACKBONES)}", EX_USAGE)
    precision_names = _split(precisions) or list(DEFAULT_PRECISIONS)
    for name in precision_names:
        if name not in PRECISIONS:
            fail(f"unknown precision {name!r}; valid: {', '.join(PRECISIONS)}", EX_USAGE)
    onnx_missing = missing_packages()
    runtime_names = _split(runtimes) or [r for r in DEFAULT_RUNTIMES
                                         if r == "torch" or not onnx_missing]
    for name in runtime_names:
        if name not in RUNTIMES:
            fail(f"unknown runtime {name!r}; valid: {', '.join(RUNTIMES)}", EX_USAGE)

    cache = cache_dir(config)
    if folder is not None:
        photos = folder_photos(folder, count)
        if not photos:
            fail(f"{folder}: no photos in this folder", EX_USAGE)
        source = str(folder)
    else:
        from tagger.sample_photos import generate_photos

        click.echo(f"bench: generating {count} sample 12 MP JPEGs in {cache / 'bench-photos'} "
                   "(once)", err=True)
        photos = generate_photos(count, cache / "bench-photos")
        source = "generated 12 MP JPEGs (synthetic: agreement on them is only a sanity check)"
    calibration_photos = folder_photos(calibration, None) if calibration else photos

    base = {
        "photos": [str(p) for p in photos],
        "calibration": [str(p) for p in calibration_photos[:256]],
        "cache_dir": str(cache),
        "prepared_dir": str(cache / "bench"),
        "batch_size": config.model.batch_size,
        "threads": config.model.threads,
        "decode_threads": config.model.decode_threads,
        "labels_file": str(config.labels.file) if config.labels.file else None,
    }
    from tagger.precision import CpuFeatures

    features = CpuFeatures.detect()
    skipped = []
    combos = [("fp32", "torch")]  # always: the reference for agreement
    for precision in precision_names:
        why_not = {"bf16": features.bf16_unsupported(),
                   "int8": features.int8_unsupported() or (onnx_missing and "onnxruntime not installed")
                   }.get(precision)
        if why_not:
            skipped.append(f"{precision} skipped: {why_not}")
            continue
        # bf16 always runs in torch and int8 in ONNX Runtime: one row each, whatever the runtimes.
        fixed = {"bf16": "torch", "int8": "onnxruntime"}.get(precision)
        for runtime in ([fixed] if fixed else runtime_names):
            if (precision, runtime) not in combos:
                combos.append((precision, runtime))
    rows: list[dict] = []
    for model in model_names:
        weights = config.model.weights if model == config.model.name else None
        for precision, runtime in ([("naive", "torch")] if naive else []) + combos:
            click.echo(f"bench: {model} {precision} {runtime} ...", err=True)
            spec = dict(base, model=model, weights_file=str(weights) if weights else None,
                        precision=precision, runtime=runtime)
            if precision in ("int8", "auto"):
                # Quantize (or decide) in a child of its own, so that the measured child finds
                # the prepared model cached and its peak RSS is that of tagging alone.
                prepared = _run_child(dict(spec, prepare_only=True), verbose=app.verbose)
                if prepared.get("error"):
                    rows.append(prepared)
                    continue
            rows.append(_run_child(spec, verbose=app.verbose))
    _add_agreement(rows)
    report = {
        "photos": source, "count": len(photos), "cpu_count": _cpu_count(),
        "cpu": {"arch": features.arch,
                "flags": sorted(features.flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                                  "amx_int8", "avx512_vnni", "avx_vnni", "asimddp", "bf16"})},
        "rows": rows,
        "skipped": skipped,
    }
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        click.echo()
    else:
        click.echo(format_table(report))
    if any(row.get("error") for row in rows):
        sys.exit(1)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _run_child(spec: dict, *, verbose: bool) -> dict:
    """Run one combination in a child Python process; its last stdout line is the JSON result."""
    command = [sys.executable, "-c", "import daemon.cmd_bench as b; b.child_main()"]
    child = subprocess.run(command, input=json.dumps(spec), capture_output=True, text=True)
    if verbose and child.stderr:
        sys.stderr.write(child.stderr)
    lines = child.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": spec["model"], "precision": spec["precision"], "runtime": spec["runtime"],
                "error": f"child process failed (exit {child.returncode}): {tail}"}


def _add_agreement(rows: list[dict]) -> None:
    """Top-1 agreement of each row with its model's fp32 torch row (real weights only)."""
    reference = {row["model"]: row for row in rows
                 if row.get("precision") == "fp32" and row.get("runtime") == "torch"
                 and row.get("requested") == "fp32" and not row.get("error")}
    for row in rows:
        ref = reference.get(row["model"])
        row["agreement"] = None
        if row.get("error") or ref is None or row.get("random_weights"):
            continue
        pairs = [(a, b) for a, b in zip(row["top1"], ref["top1"]) if a is not None and b is not None]
        if pairs:
            row["agreement"] = sum(a == b for a, b in pairs) / len(pairs)


def format_table(report: dict) -> str:
    header = (f"{'model':<20} {'precision':<12} {'runtime':<12} {'img/s':>7} {'decode':>7} "
              f"{'resize':>7} {'infer':>7} {'peak RSS':>9} {'top-1 agree':>11}  weights")
    lines = [
        f"photos: {report['count']} x {report['photos']}; {report['cpu_count']} cores; "
        f"CPU {report['cpu']['arch']} {' '.join(report['cpu']['flags']) or '(no AVX2)'}",
        "decode and resize: CPU ms per image in the decode threads; infer: ms per image in the "
        "inference thread; agreement: with the same model's fp32 torch top-1",
        "",
        header,
        "-" * len(header),
    ]
    notes = []
    for row in report["rows"]:
        if row.get("error"):
            lines.append(f"{row['model']:<20} {row['precision']:<12} {row['runtime']:<12} failed: {row['error']}")
            continue
        precision, runtime = row["precision"], row["runtime"]
        if row.get("requested") not in (None, precision):
            precision = f"{row['requested']}->{precision}"
        if row.get("requested_runtime") not in (None, runtime):
            runtime = f"{row['requested_runtime'][:5]}->{runtime[:4]}"
        agreement = "-" if row.get("agreement") is None else f"{row['agreement']:.1%}"
        weights = "random (timing only)" if row.get("random_weights") else "real"
        stage = row.get("ms_per_image", {})
        rss = "-" if row.get("peak_rss_mb") is None else f"{row['peak_rss_mb']:.0f} MB"
        lines.append(
            f"{row['model']:<20} {precision:<12} {runtime:<12} {row['images_per_s']:>7.1f} "
            f"{stage.get('decode', 0):>7.1f} {stage.get('preprocess', 0):>7.1f} "
            f"{stage.get('inference', 0):>7.1f} {rss:>9} {agreement:>11}  {weights}"
        )
        label = f"  {row['model']} {precision} {runtime}"
        if row.get("reason") and not row["reason"].endswith("as configured"):
            notes.append(f"{label}: {row['reason']}")
        if row.get("rechecked") is not None and not row.get("random_weights"):
            notes.append(f"{label}: {row['rechecked']:.0%} of photos were close calls re-run in fp32")
        elif row.get("random_weights") and row["precision"] == "int8":
            notes.append(f"{label}: timed without the fp32 re-check of close calls (random weights)")
        if row.get("failed_photos"):
            notes.append(f"{label}: {row['failed_photos']} photos could not be read")
    notes += [f"  {note}" for note in report.get("skipped", [])]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------- child process


def child_main() -> None:
    """Entry point of the child process: read a spec on stdin, tag, print one JSON line."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    spec = json.loads(sys.stdin.read())
    try:
        result = _measure(spec)
    except Exception as e:  # reported as the row's error; the parent goes on with the others
        result = {"model": spec["model"], "precision": spec["precision"], "runtime": spec["runtime"],
                  "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(result) + "\n")


def _weights(spec: dict):
    """The backbone and its weights file; None when not found (seeded random weights are timed)."""
    from tagger.backbones import get_backbone
    from tagger.weights import find_weights

    backbone = get_backbone(spec["model"])
    weights_file = Path(spec["weights_file"]) if spec.get("weights_file") else None
    return backbone, find_weights(backbone, weights_file=weights_file, cache_dir=Path(spec["cache_dir"]))


def _peak_rss_mb() -> float | None:
    """This process's peak resident set size (VmHWM; ru_maxrss would include the parent's, as
    Linux keeps it across fork and exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _measure(spec: dict) -> dict:
    import time

    from tagger.engine import Tagger
    from tagger.labels import load_label_map
    from tagger.precision import RECHECK_MARGIN, prepare_model

    photos = [Path(p) for p in spec["photos"]]
    backbone, weights = _weights(spec)
    random_weights = weights is None
    row = {"model": spec["model"], "requested": spec["precision"],
           "requested_runtime": spec["runtime"], "random_weights": random_weights}
    if spec["precision"] == "naive":
        from tagger.torch_runtime import build_model

        model = build_model(backbone, weights)
        return row | _measure_naive(backbone, model, photos) | {"peak_rss_mb": _peak_rss_mb()}

    start = time.perf_counter()
    # With random weights every prediction is a close call: time int8 without the fp32 re-check.
    margin = 0.0 if random_weights else RECHECK_MARGIN
    prepared = prepare_model(backbone, weights, spec["precision"], runtime=spec["runtime"],
                             cache_dir=spec["prepared_dir"], calibration=spec["calibration"],
                             recheck_margin=margin, threads=spec["threads"])
    prepare_s = time.perf_counter() - start
    if spec.get("prepare_only"):
        return row | {"precision": prepared.precision, "runtime": prepared.runtime,
                      "prepare_s": prepare_s}
    labels = load_label_map(Path(spec["labels_file"]) if spec.get("labels_file") else None)
    tagger = Tagger(backbone, prepared.predictor, labels, batch_size=spec["batch_size"],
                    threads=spec["threads"], decode_threads=spec["decode_threads"])
    # Warm-up: one batch (session creation, allocator, oneDNN primitive caches).
    for _ in tagger.tag_files(photos[:tagger.batch_size], top=1):
        pass
    for counter in ("images", "rechecked"):
        if hasattr(prepared.predictor, counter):
            setattr(prepared.predictor, counter, 0)
    tagger.stats = type(tagger.stats)()
    start = time.perf_counter()
    results = list(tagger.tag_files(photos, top=1))
    elapsed = time.perf_counter() - start
    stats = tagger.stats
    done = max(stats.images, 1)
    row |= {
        "precision": prepared.precision,
        "runtime": prepared.runtime,
        "reason": prepared.reason,
        "images": len(results),
        "failed_photos": sum(not r.ok for r in results),
        "seconds": elapsed,
        "images_per_s": len(results) / elapsed if elapsed else 0.0,
        "ms_per_image": {
            "decode": stats.decode / done * 1000,
            "preprocess": stats.preprocess / done * 1000,
            "inference": stats.inference / done * 1000,
            "wall": elapsed / max(len(results), 1) * 1000,
        },
        "prepare_s": prepare_s,
        "threads": tagger.threads,
        "decode_threads": tagger.decode_threads,
        "batch_size": tagger.batch_size,
        "top1": [r.classes[0].index if r.ok and r.classes else None for r in results],
        "peak_rss_mb": _peak_rss_mb(),
    }
    predictor = prepared.predictor
    if getattr(predictor, "images", 0):
        row["rechecked"] = predictor.rechecked / predictor.images
    return row


def _measure_naive(backbone, model, photos: list[Path]) -> dict:
    """Full decode, torchvision's transforms, batch of 1: a per-request web service's pipeline."""
    import time

    import torch

    from tagger.preprocess import reference_load, reference_transform
    from tagger.engine import cpu_count

    torch.set_num_threads(cpu_count())
    transform = reference_transform(backbone)
    decode = preprocess = inference = 0.0
    top1: list[int | None] = []
    with torch.inference_mode():
        model(transform(reference_load(photos[0])).unsqueeze(0))  # warm-up
        start = time.perf_counter()
        for path in photos:
            t0 = time.perf_counter()
            try:
                image = reference_load(path)
            except Exception:
                top1.append(None)
                continue
            t1 = time.perf_counter()
            batch = transform(image).unsqueeze(0)
            t2 = time.perf_counter()
            top1.append(int(model(batch).argmax()))
            t3 = time.perf_counter()
            decode, preprocess, inference = decode + t1 - t0, preprocess + t2 - t1, inference + t3 - t2
        elapsed = time.perf_counter() - start
    n = max(len(photos), 1)
    return {
        "precision": "naive", "runtime": "torch", "reason": "naive pipeline (fp32, batch 1)",
        "images": len(photos), "seconds": elapsed, "images_per_s": len(photos) / elapsed,
        "ms_per_image": {"decode": decode / n * 1000, "preprocess": preprocess / n * 1000,
                         "inference": inference / n * 1000, "wall": elapsed / n * 1000},
        "threads": torch.get_num_threads(), "top1": top1,
    }
