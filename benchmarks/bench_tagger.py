"""Tagger throughput: the naive pipeline against phototag's, in one process, on the same files.

    python benchmarks/bench_tagger.py [FOLDER] [--count N] [--agreement-folder DIR]

(A) naive: full decode, torchvision's reference transforms, batch of 1 (a per-request web service).
(B) phototag's Tagger: draft-mode decode in a thread pool overlapping batched inference.
Both use the same model (ResNet-18 with random weights unless ``--weights`` names a file; speed does
not depend on the weights). Prints images/s, B/A, per-stage milliseconds per image and each phase's
peak RSS. With ``--agreement-folder``, also the top-1 agreement between B's preprocessing and the
reference one, measured with EfficientNet-Lite0's real weights (random weights make top-1 meaningless).

Without FOLDER, deterministic 12 MP JPEGs are generated once into the cache (see photos.py).
Targets on 2 cores, float32: B >= 25 images/s, B/A >= 5, agreement >= 99%.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from photos import benchmark_photos, folder_photos
from tagger.backbones import get_backbone
from tagger.weights import load_model
from tagger.engine import Tagger, cpu_count, default_threads
from tagger.labels import load_label_map
from tagger.preprocess import reference_load, reference_transform
from tagger.torch_runtime import TorchPredictor


class PeakRSS:
    """The highest resident set size seen while the ``with`` block runs (sampled every 5 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(0.005)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def run_naive(paths: list[Path], backbone, model) -> dict:
    transform = reference_transform(backbone)
    decode = preprocess = inference = 0.0
    start, cpu = time.perf_counter(), time.process_time()
    with PeakRSS() as rss, torch.inference_mode():
        for path in paths:
            t0 = time.perf_counter()
            image = reference_load(path)
            t1 = time.perf_counter()
            tensor = transform(image)
            t2 = time.perf_counter()
            model(tensor.unsqueeze(0)).softmax(dim=1)
            t3 = time.perf_counter()
            decode, preprocess, inference = decode + t1 - t0, preprocess + t2 - t1, inference + t3 - t2
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = len(paths)
    return {"wall": wall, "rate": n / wall, "cpu": cpu / n, "decode": decode / n,
            "preprocess": preprocess / n, "inference": inference / n, "rss": rss.peak}


def run_tagger(paths: list[Path], tagger: Tagger) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    with PeakRSS() as rss:
        results = list(tagger.tag_files(paths, top=5))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"  failed: {r.path}: {r.error}")
    n, s = len(paths), tagger.stats
    return {"wall": wall, "rate": n / wall, "cpu": cpu / n, "decode": s.decode / n,
            "preprocess": s.preprocess / n, "inference": s.inference / n, "rss": rss.peak}


def make_predictor(backbone, weights: Path | None, runtime: str, cache_dir: Path):
    """B's predictor, fp32, made exactly as phototag makes it (``tagger.precision.prepare_model``:
    channels-last torch, or the model exported to ONNX Runtime)."""
    from tagger.precision import prepare_model

    return prepare_model(backbone, weights, "fp32", runtime=runtime, cache_dir=cache_dir).predictor


def compare_splits(paths: list[Path], make_tagger, splits: str, repeat: int) -> None:
    """B with each inference+decode thread split, the splits interleaved run by run so that a
    busy spell of the machine hurts them alike; prints each run's images/s and the median."""
    import statistics

    pairs = [tuple(int(n) for n in split.split("+")) for split in splits.split(",")]
    rates: dict[tuple[int, int], list[float]] = {pair: [] for pair in pairs}
    for _ in range(repeat):
        for pair in pairs:
            rates[pair].append(run_tagger(paths, make_tagger(*pair))["rate"])
    print(f"\nthread splits (inference+decode), images/s over {repeat} interleaved runs:")
    for (threads, decode), values in rates.items():
        runs = " ".join(f"{v:5.1f}" for v in values)
        print(f"  {threads}+{decode}: median {statistics.median(values):5.1f}   runs {runs}")


def agreement(paths: list[Path], batch_size: int) -> tuple[int, int]:
    """Photos whose top-1 class is the same with phototag's and the reference preprocessing."""
    import platformdirs

    backbone, model = load_model("efficientnet_lite0", cache_dir=platformdirs.user_cache_path("phototag"))
    tagger = Tagger(backbone, TorchPredictor(model, backbone), load_label_map(), batch_size=batch_size)
    fast = [r.classes[0].index if r.ok else None for r in tagger.tag_files(paths, top=1)]
    transform = reference_transform(backbone)
    same = 0
    with torch.inference_mode():
        for path, mine in zip(paths, fast):
            reference = model(transform(reference_load(path)).unsqueeze(0)).argmax().item()
            if reference == mine:
                same += 1
            else:
                print(f"  top-1 differs: {path.name}: phototag {mine}, reference {reference}")
    return same, len(paths)


def enlarge(path: Path, folder: Path, factor: int) -> Path:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        out = folder / f"{path.stem}-x{factor}.jpg"
        im.resize((im.width * factor, im.height * factor), Image.Resampling.BICUBIC).save(out, quality=90)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, help="photos to use (default: generated 12 MP JPEGs)")
    parser.add_argument("--count", type=int, default=48, help="number of photos (default 48)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--weights", type=Path, help="weights file (default: random weights)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="inference threads (0: chosen for the cores)")
    parser.add_argument("--decode-threads", type=int, default=0, help="decode threads (0: chosen)")
    parser.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch",
                        help="what runs B's model (default torch; A is always torch)")
    parser.add_argument("--splits", metavar="I+D[,I+D...]",
                        help="also run B with these inference+decode thread splits side by side, "
                             "e.g. 1+1,1+2,2+2 (each --repeat times, interleaved)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per split (default 3)")
    parser.add_argument("--skip-naive", action="store_true", help="run only phototag's pipeline")
    parser.add_argument("--agreement-folder", type=Path,
                        help="real photos for the top-1 agreement check (EfficientNet-Lite0 real weights)")
    parser.add_argument("--agreement-count", type=int, default=None)
    parser.add_argument("--agreement-upscale", type=int, default=4, metavar="K",
                        help="also measure on copies enlarged K times (JPEG q90), which draft mode "
                             "decodes at 1/K, like a camera photo (default 4; 0: skip)")
    args = parser.parse_args()

    paths = benchmark_photos(args.folder, args.count)
    if not paths:
        parser.error(f"no photos in {args.folder}")
    for path in paths:  # warm the page cache, so that neither pipeline pays for the disk
        path.read_bytes()
    backbone = get_backbone(args.model)
    model = backbone.build(args.weights)
    weights = str(args.weights) if args.weights else "random weights"
    predictor = make_predictor(backbone, args.weights, args.runtime,
                               Path(tempfile.mkdtemp(prefix="bench_tagger_")))

    def make_tagger(threads: int, decode_threads: int) -> Tagger:
        return Tagger(backbone, predictor, load_label_map(), batch_size=args.batch_size,
                      threads=threads, decode_threads=decode_threads)

    tagger = make_tagger(args.threads, args.decode_threads)
    print(f"{len(paths)} photos from {paths[0].parent}; {args.model} ({weights}), float32 on {args.runtime}; "
          f"{cpu_count()} cores (default split: {default_threads(cpu_count())[0]} inference, "
          f"{default_threads(cpu_count())[1]} decode threads)")
    with torch.inference_mode():  # first calls allocate and pick kernels; keep that out of the timings
        model(torch.zeros(args.batch_size, 3, backbone.crop, backbone.crop))

    header = (f"{'pipeline':<32} {'img/s':>7} {'CPU/img':>8} {'decode':>8} {'preproc':>8} {'infer':>8} "
              f"{'peak RSS':>9}")
    rows = []
    if not args.skip_naive:
        naive = run_naive(paths, backbone, model)
        rows.append(("A naive (full decode, batch 1)", naive))
    fast = run_tagger(paths, tagger)
    rows.append((f"B phototag (batch {tagger.batch_size}, {tagger.threads}+{tagger.decode_threads} thr)", fast))
    print(header)
    for name, r in rows:
        print(f"{name:<32} {r['rate']:7.1f} {r['cpu'] * 1e3:6.1f}ms {r['decode'] * 1e3:6.1f}ms {r['preprocess'] * 1e3:6.1f}ms "
              f"{r['inference'] * 1e3:6.1f}ms {r['rss'] / 2**20:6.0f}MiB")
    print("(ms per image; CPU/img is the process's CPU time, which other load on the machine disturbs\n"
          " less than img/s does; B's decode and preprocess are summed over its decode threads, and its\n"
          " preprocess is resize+crop: normalising is part of the batch's inference)")
    if not args.skip_naive:
        print(f"B/A = {fast['rate'] / naive['rate']:.1f}x")
    if args.splits:
        compare_splits(paths, make_tagger, args.splits, args.repeat)
    if args.agreement_folder:
        real = folder_photos(args.agreement_folder, args.agreement_count)
        same, total = agreement(real, args.batch_size)
        print(f"top-1 agreement with the reference preprocessing (efficientnet_lite0, real weights, "
              f"{args.agreement_folder}): {same}/{total} = {same / total:.1%}")
        if args.agreement_upscale:
            with tempfile.TemporaryDirectory() as folder:
                enlarged = [enlarge(p, Path(folder), args.agreement_upscale) for p in real]
                same, total = agreement(enlarged, args.batch_size)
            print(f"  the same photos enlarged {args.agreement_upscale}x (draft-mode decoding): "
                  f"{same}/{total} = {same / total:.1%}")


if __name__ == "__main__":
    main()
