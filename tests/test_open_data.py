"""Open data: .npz arrays, image folders, generated colour shapes and a user's own loader
train, evaluate and resume like MNIST; bad data ends in one line naming the file and the fix."""
import json
import logging
import re
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_png, compose_config, read_metrics
from vae_lab.checkpoint import load_checkpoint
from vae_lab.cli import run_task
from vae_lab.data import DataCorruptError, DataNotFoundError, DataTooLargeError, ImageData, as_float
from vae_lab.data.arrays import load_arrays
from vae_lab.data.folder import load_image_folder
from vae_lab.data.shapes import FACTORS, make_shapes
from vae_lab.errors import CheckpointError, ConfigError, VaeLabError

# Small runs: 1 epoch, a few figures, no sample metrics (tests/test_sample_quality.py covers those).
RUN = ["figures=true", "train.epochs=1", "train.batch_size=32", "evaluate.embedding_points=64", "evaluate.generation_samples=16",
       "evaluate.images_per_row=8", "train.evaluate_at_end=true"]


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture
def digits_npz(tmp_path):
    """A 1 x 20 x 20 uint8 set with labels: 96 train, 40 test."""
    rng = np.random.default_rng(0)
    return save_npz(tmp_path / "digits.npz", x_train=rng.integers(0, 256, (96, 1, 20, 20), dtype=np.uint8),
                    x_test=rng.integers(0, 256, (40, 1, 20, 20), dtype=np.uint8),
                    y_train=rng.integers(0, 4, 96), y_test=rng.integers(0, 4, 40))


def write_pngs(folder, images, labels=None, names=("a", "b", "c")):
    """images (N, H, W, 3) uint8 as PNG files, in class folders when labels are given."""
    for i, image in enumerate(images):
        target = folder / names[labels[i]] if labels is not None else folder
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{i:04d}.png")


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """60 generated colour shapes, 3 x 32 x 32, as PNGs in one folder per shape."""
    folder = tmp_path_factory.mktemp("colour") / "shapes"
    data = make_shapes(train_size=60, test_size=1, image_size=32, seed=3)
    pixels = data.train_images.permute(0, 2, 3, 1).numpy()  # shapes are stored as uint8
    write_pngs(folder, pixels, data.train_labels.numpy(), names=("circle", "square", "triangle"))
    return folder


# --- the loaders -------------------------------------------------------------------------------


def test_an_npz_loads_with_its_shape_labels_and_value_kind(digits_npz):
    data = load_arrays(digits_npz)
    assert data.image_shape == (1, 20, 20) and data.values == "8bit" and data.labelled
    raw = np.load(digits_npz)
    assert data.train_images.dtype == torch.uint8  # kept as 8-bit levels, a quarter of float32's memory
    assert torch.equal(data.train_images, torch.from_numpy(raw["x_train"]))
    assert torch.equal(as_float(data.train_images[0, 0]), torch.from_numpy(raw["x_train"][0, 0]).float() / 255)
    assert data.train_labels.tolist() == raw["y_train"].tolist() and len(data.test_images) == 40
    assert data.name == "digits" and data.variant == "intensities in [0, 1]"


def test_channels_last_float_arrays_are_read_as_nchw_and_unlabelled_data_says_so(tmp_path):
    x = np.random.default_rng(1).random((12, 8, 8, 3)).astype(np.float32)
    data = load_arrays(save_npz(tmp_path / "f.npz", x_train=x, x_test=x[:4]))
    assert data.image_shape == (3, 8, 8) and data.values == "continuous" and not data.labelled
    assert torch.allclose(data.train_images[2, 1], torch.from_numpy(x[2, :, :, 1]))
    binary = load_arrays(save_npz(tmp_path / "b.npz", x_train=(x > 0.5).astype(np.float32), x_test=(x[:4] > 0.5).astype(np.float32)))
    assert binary.values == "binary" and binary.binary


@pytest.mark.parametrize("arrays, message", [
    (dict(x_test=np.zeros((2, 1, 4, 4), np.uint8)), "has no x_train"),
    (dict(x_train=np.zeros((2, 1, 4, 4), np.int64), x_test=np.zeros((2, 1, 4, 4), np.int64)), "x_train has dtype int64; use uint8"),
    (dict(x_train=np.full((2, 1, 4, 4), np.nan, np.float32), x_test=np.zeros((2, 1, 4, 4), np.float32)), "NaN or infinite"),
    (dict(x_train=np.full((2, 1, 4, 4), 2.0, np.float32), x_test=np.zeros((2, 1, 4, 4), np.float32)), "values from 2 to 2; float images must lie in [0, 1]"),
    (dict(x_train=np.zeros((2, 1, 4, 4), np.uint8), x_test=np.zeros((2, 1, 4, 4), np.uint8), y_train=np.zeros(3, np.int64),
          y_test=np.zeros(2, np.int64)), "y_train holds 3 labels but x_train holds 2 images"),
    (dict(x_train=np.zeros((2, 1, 4, 4), np.uint8), x_test=np.zeros((2, 1, 4, 4), np.uint8), y_train=np.zeros(2, np.int64)),
     "has y_train but not y_test"),
    (dict(x_train=np.zeros((2, 3, 4, 3), np.uint8), x_test=np.zeros((2, 3, 4, 3), np.uint8)), "Set data.layout=NCHW or data.layout=NHWC"),
    (dict(x_train=np.zeros((2, 5, 4, 4), np.uint8), x_test=np.zeros((2, 5, 4, 4), np.uint8)), "x_train has 5 channels"),
    (dict(x_train=np.zeros((2, 1, 4, 4), np.uint8), x_test=np.zeros((2, 1, 6, 6), np.uint8)), "both splits need one image shape"),
])
def test_a_bad_npz_is_one_line_naming_the_file_and_what_is_wrong(tmp_path, arrays, message):
    path = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataCorruptError, match=f"cannot use {path}: .*{_escape(message)}"):
        load_arrays(path)


def test_a_file_that_is_not_an_npz_archive_is_named(tmp_path):
    npy = tmp_path / "images.npy"
    np.save(npy, np.zeros((4, 1, 8, 8), np.uint8))
    with pytest.raises(DataCorruptError, match="it is not an .npz archive"):
        load_arrays(npy)


def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    folder = tmp_path / "bomb"
    folder.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "big.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "other.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 is then over twice the limit, as a real bomb is
    with pytest.raises(DataCorruptError, match="cannot use .*big.png: .*decompression bomb"):
        load_image_folder(folder)


def test_an_npz_too_large_for_memory_is_refused_from_its_listing_before_reading(digits_npz, monkeypatch):
    import vae_lab.data as data_module

    monkeypatch.setattr(data_module, "device_memory_bytes", lambda device: 2 * 136 * 400 - 1)  # less than twice the pixels
    with pytest.raises(DataTooLargeError, match=r"digits.npz: its arrays take 0.0 GiB uncompressed, more than half"):
        load_arrays(digits_npz)


def test_shapes_too_large_to_draw_in_memory_are_refused_before_drawing(monkeypatch):
    import vae_lab.data as data_module

    monkeypatch.setattr(data_module, "device_memory_bytes", lambda device: 2 ** 20)
    with pytest.raises(DataTooLargeError, match=r"data=shapes: 1,100 images of 3 x 32 x 32 .* Lower data.train_size"):
        make_shapes(train_size=1000, test_size=100)


def test_an_npz_of_python_objects_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x_train=np.array([{"a": 1}], dtype=object), x_test=np.zeros((1, 1, 2, 2), np.uint8))
    with pytest.raises(DataCorruptError, match="holds Python objects"):
        load_arrays(path)


def test_the_wrong_kind_of_path_says_which_loader_reads_it(tmp_path, digits_npz):
    with pytest.raises(DataNotFoundError, match="is a folder; data=arrays reads an .npz file .*data=image_folder"):
        load_arrays(tmp_path)
    with pytest.raises(DataNotFoundError, match="is a file; data=image_folder reads a folder .*data=arrays"):
        load_image_folder(digits_npz)


def test_an_image_folder_gives_classes_a_seeded_split_and_a_cache_that_follows_the_files(colour_folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="vae_lab.data.folder")
    data = load_image_folder(colour_folder, cache_dir=cache)
    assert data.image_shape == (3, 32, 32) and data.values == "8bit" and data.classes == ("circle", "square", "triangle")
    assert len(data.train_images) == 54 and len(data.test_images) == 6 and data.labelled
    assert "decoded 60 images" in caplog.text
    again = load_image_folder(colour_folder, cache_dir=cache)  # from the cache: no decoding
    assert torch.equal(again.train_images, data.train_images) and torch.equal(again.test_labels, data.test_labels)
    assert caplog.text.count("decoded") == 1
    assert not any(p.suffix == ".pt" for p in colour_folder.rglob("*"))  # nothing written into the user's folder
    other_split = load_image_folder(colour_folder, cache_dir=cache, seed=1)
    assert not torch.equal(other_split.test_labels, data.test_labels) or not torch.equal(other_split.test_images, data.test_images)
    extra = colour_folder / "circle" / "extra.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(extra)
    try:
        grown = load_image_folder(colour_folder, cache_dir=cache)  # a file added: decoded again
        assert len(grown.train_images) + len(grown.test_images) == 61 and caplog.text.count("decoded") == 3
    finally:
        extra.unlink()


def test_a_damaged_image_cache_is_decoded_again_never_used(colour_folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = load_image_folder(colour_folder, cache_dir=cache)
    (path,) = (cache / "image_folder").glob("*.pt")
    state = torch.load(path, weights_only=True)
    state["train_images"][0, 0, 0, 0] ^= 0x40  # one changed pixel: its digest no longer matches
    torch.save(state, path)
    with caplog.at_level(logging.WARNING, logger="vae_lab.data.folder"):
        again = load_image_folder(colour_folder, cache_dir=cache)
    assert "ignoring the damaged image cache" in caplog.text
    assert torch.equal(again.train_images, first.train_images)


def test_an_image_folder_converts_channels_resizes_and_keeps_train_and_test_folders(tmp_path):
    rng = np.random.default_rng(0)
    write_pngs(tmp_path / "set" / "train", rng.integers(0, 256, (6, 20, 24, 3), dtype=np.uint8), [0, 1, 0, 1, 0, 1])
    write_pngs(tmp_path / "set" / "test", rng.integers(0, 256, (2, 20, 24, 3), dtype=np.uint8), [0, 1])
    data = load_image_folder(tmp_path / "set", image_size=16, channels=1)
    assert data.image_shape == (1, 16, 16) and len(data.train_images) == 6 and len(data.test_images) == 2
    assert data.classes == ("a", "b") and data.test_labels.tolist() == [0, 1]
    flat = tmp_path / "flat"
    write_pngs(flat, rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8))
    unlabelled = load_image_folder(flat, test_fraction=0.4)
    assert not unlabelled.labelled and len(unlabelled.test_images) == 2 and unlabelled.image_shape == (3, 8, 8)


@pytest.mark.parametrize("case, message", [
    ("empty", "holds no images of a known format .*: it is empty"),
    ("text only", "holds no images of a known format .*; it holds notes.txt"),
    ("corrupt image", "cannot use .*broken.png: it is not a readable image"),
    ("mixed sizes", "different sizes .*set data.image_size=N"),
    ("images beside class folders", "holds images .* beside class folders"),
    ("one image", "holds one image"),
    ("floating-point pixels", "cannot use .*float.png: it holds floating-point pixels, .*data=arrays"),
])
def test_a_bad_image_folder_is_one_line_naming_what_to_do(tmp_path, case, message):
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.zeros((8, 8, 3), np.uint8)
    if case == "text only":
        (folder / "notes.txt").write_text("no images here\n")
    if case == "corrupt image":
        Image.fromarray(pixels).save(folder / "good.png")
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    if case == "mixed sizes":
        Image.fromarray(pixels).save(folder / "small.png")
        Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(folder / "large.png")
    if case == "images beside class folders":
        Image.fromarray(pixels).save(folder / "loose.png")
        (folder / "cats").mkdir()
        Image.fromarray(pixels).save(folder / "cats" / "cat.png")
    if case == "one image":
        Image.fromarray(pixels).save(folder / "only.png")
    if case == "floating-point pixels":  # Pillow opens by content: a TIFF of floats named .png
        Image.fromarray(pixels).save(folder / "good.png")
        Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(folder / "float.png", format="TIFF")
    with pytest.raises(VaeLabError, match=message):
        load_image_folder(folder)


def test_16bit_images_are_scaled_to_8_bits_never_clipped_and_the_run_says_so(tmp_path, caplog):
    """Pillow's own conversion of a 16-bit PNG clips at 255: most of a 16-bit scan would read as white."""
    levels = [0, 257 * 60, 257 * 200, 65535]
    for i, level in enumerate(levels):
        Image.fromarray(np.full((4, 4), level, np.uint16)).save(tmp_path / f"{i}.png")
    with caplog.at_level(logging.WARNING, logger="vae_lab.data.folder"):
        grey = load_image_folder(tmp_path, test_fraction=0.25)
    found = sorted(torch.cat([grey.train_images, grey.test_images]).flatten().unique().tolist())
    assert grey.image_shape == (1, 4, 4) and found == [0, 60, 200, 255]
    assert "4 of the 4 images" in caplog.text and "16-bit" in caplog.text
    colour = load_image_folder(tmp_path, test_fraction=0.25, channels=3)
    assert colour.image_shape == (3, 4, 4) and sorted(torch.cat([colour.train_images, colour.test_images]).unique().tolist()) == found


def test_shapes_are_seeded_coloured_and_keep_their_factors():
    data = make_shapes(train_size=64, test_size=16, image_size=24, seed=5)
    assert data.image_shape == (3, 24, 24) and data.factor_names == FACTORS and data.train_factors.shape == (64, 6)
    assert torch.equal(data.train_labels, data.train_factors[:, 0].long()) and data.classes == ("circle", "square", "triangle")
    assert torch.equal(make_shapes(train_size=64, test_size=16, image_size=24, seed=5).train_images, data.train_images)
    assert not torch.equal(make_shapes(train_size=64, test_size=16, image_size=24, seed=6).train_images, data.train_images)
    assert data.train_images.dtype == torch.uint8 and data.values == "8bit"
    channels = as_float(data.train_images).amax(dim=(2, 3))  # (N, 3): each image's brightest value per channel
    assert (channels.max(1).values - channels.min(1).values > 0.5).float().mean() > 0.9  # colour, not grey
    covered = (data.train_images.amax(1) > 0).float().mean((1, 2))
    assert covered.min() > 0.03 and covered.max() < 0.6  # one shape on a background
    assert make_shapes(train_size=64, test_size=16, limit=10).train_factors.shape == (10, 6)


def test_8bit_images_are_stored_as_uint8_and_train_exactly_as_their_float_copy():
    """A quarter of the memory, and not one bit of difference in what the model sees or learns."""
    from dataclasses import replace

    from vae_lab.engine import run_epoch
    from vae_lab.model import MLPVAE
    from vae_lab.objectives import ELBO

    data = make_shapes(train_size=96, test_size=32, image_size=16, seed=2)
    floats = replace(data, train_images=as_float(data.train_images), test_images=as_float(data.test_images))
    assert data.train_images.dtype == torch.uint8 and floats.train_images.dtype == torch.float32
    assert data.nbytes < floats.nbytes / 3
    results = []
    for stored in (data, floats):
        torch.manual_seed(0)
        objective = ELBO("gaussian")
        model = MLPVAE(latent_dim=4, hidden_dim=32, image_shape=stored.image_shape, likelihood=objective.likelihood)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        trained = run_epoch(model, objective, stored.train_images, 32, optimizer=optimizer, generator=torch.Generator().manual_seed(1))
        tested = run_epoch(model, objective, stored.test_images, 32)
        results.append((trained, tested, [p.detach().clone() for p in model.parameters()]))
    assert results[0][:2] == results[1][:2]
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2]))


def test_a_data_set_too_large_for_the_device_is_refused_before_it_is_copied(monkeypatch):
    import vae_lab.data as data_module

    data = make_shapes(train_size=64, test_size=16, image_size=16)
    monkeypatch.setattr(data_module, "device_memory_bytes", lambda device: data.nbytes)  # the set would take all of it
    with pytest.raises(DataTooLargeError, match=r"64 \+ 16 images of 3 x 16 x 16 take .* GiB as uint8.*data\.limit"):
        data.to("meta")
    monkeypatch.setattr(data_module, "device_memory_bytes", lambda device: 4 * data.nbytes)
    assert data.to("meta").train_images.device.type == "meta"


def test_an_image_folder_too_large_for_memory_is_refused_from_its_headers_before_decoding(colour_folder, tmp_path, monkeypatch):
    import vae_lab.data as data_module
    import vae_lab.data.folder as folder_module

    monkeypatch.setattr(data_module, "device_memory_bytes", lambda device: 2 * 60 * 3 * 32 * 32 - 1)  # just too little
    monkeypatch.setattr(folder_module, "_pixels", lambda *args: pytest.fail("decoded before the size was checked"))
    with pytest.raises(DataTooLargeError, match=r"60 images of 3 x 32 x 32 take 0.0 GiB as uint8, more than half .* data.image_size"):
        load_image_folder(colour_folder, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("labels, message", [
    (torch.zeros(4, dtype=torch.int32), "train_labels are torch.int32; return class indices as int64"),
    (torch.tensor([0, 1, 2, 10**9]), "train_labels run from 0 to 1000000000; labels are class indices 0, 1, ..., at most 9,999"),
    (torch.tensor([0, -1, 0, 1]), "train_labels run from -1 to 1"),
])
def test_labels_that_are_not_class_indices_are_refused_before_anything_sized_by_them(labels, message):
    images = torch.zeros(4, 1, 8, 8)
    with pytest.raises(VaeLabError, match=f"the data loader returned an ImageData \\(mine\\) whose {message}"):
        ImageData("mine", images, labels, images, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("images, values, message", [
    (torch.zeros(4, 1, 8, 8, dtype=torch.float64), "8bit", r"train_images are torch.float64; return uint8 .* or float32 in \[0, 1\]"),
    (torch.ones(4, 1, 8, 8, dtype=torch.uint8), "binary", "train_images are uint8 but values='binary': uint8 means the 256 levels"),
    (torch.full((4, 1, 8, 8), 255.0), "8bit", r"train_images hold values from 255 to 255; float images lie in \[0, 1\]"),
    (torch.full((4, 1, 8, 8), float("nan")), "continuous", "train_images hold values from nan to nan"),
    (torch.full((4, 1, 8, 8), 0.5), "binary", "train_images are marked values='binary' but hold values other than 0 and 1"),
    (torch.full((4, 1, 8, 8), 0.3), "8bit", "train_images are marked values='8bit' .* not on the 256 levels k / 255"),
    (torch.zeros(0, 1, 8, 8), "8bit", "train_images hold no images"),
    (torch.zeros(4, 3, 8, 8), "8bit", r"train_images are \(3, 8, 8\) and test_images \(1, 8, 8\) .*; both splits need one image shape"),
])
def test_a_loader_returning_images_vae_lab_would_misread_is_told_what_to_return(images, values, message):
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(VaeLabError, match=f"the data loader returned an ImageData \\(mine\\) whose {message}"):
        ImageData("mine", images, labels[:len(images)], torch.zeros(4, 1, 8, 8), labels, values=values)


@pytest.mark.parametrize("factors, names, message", [
    (torch.zeros(3, 2), ("a", "b"), r"train_factors has shape \(3, 2\); factors are \(4, 2\)"),
    (torch.zeros(4, 2), ("a",), r"train_factors has shape \(4, 2\); factors are \(4, 1\)"),
    (torch.full((4, 1), float("nan")), ("a",), "train_factors hold NaN or infinite values"),
])
def test_factors_that_do_not_describe_the_images_are_refused(factors, names, message):
    images, labels = torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(VaeLabError, match=message):
        ImageData("mine", images, labels, images, labels, train_factors=factors, test_factors=torch.zeros(4, len(names)),
                  factor_names=names)


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["conv_vae", pytest.param("mlp_vae", marks=pytest.mark.slow)])
def test_a_colour_folder_trains_evaluates_in_colour_and_resumes_bit_exactly(colour_folder, tmp_path, model):
    data = [f"data=image_folder", f"data.path={colour_folder}", f"data.cache_dir={tmp_path / 'cache'}", f"model={model}"]
    if model == "mlp_vae":
        data.append("model.hidden_dim=64")
    run = tmp_path / "run"
    run_task(compose_config(*data, *RUN, "train.epochs=2"), run)
    report = json.loads((run / "results" / "metrics.json").read_text())
    assert report["data"] == "shapes" and report["test_images"] == 6
    for figure in ("reconstruction.png", "random_generation.png", "latent_traversal.png"):
        assert_png(run / "results" / figure, min_side=50)
    assert _has_colour(run / "results" / "reconstruction.png")  # its odd rows are the colour test images
    assert _has_colour(run / "progress" / "reconstruction_0002.png")
    assert load_checkpoint(run / "checkpoints" / "last.pt")["image_shape"] == [3, 32, 32]
    first = tmp_path / "first"
    run_task(compose_config(*data, *RUN, "train.evaluate_at_end=false"), first)
    resumed = tmp_path / "resumed"
    run_task(compose_config(*RUN, "train.epochs=2", "train.evaluate_at_end=false",
                            f"train.resume={first / 'checkpoints' / 'last.pt'}"), resumed)
    a, b = (load_checkpoint(r / "checkpoints" / "last.pt")["model"] for r in (run, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the data config came from the checkpoint, path and all


def test_a_folder_checkpoint_evaluates_on_its_folder_moved_elsewhere(colour_folder, tmp_path, monkeypatch):
    import shutil

    import vae_lab.evaluate as evaluate_module

    run = tmp_path / "run"
    run_task(compose_config("data=image_folder", f"data.path={colour_folder}", f"data.cache_dir={tmp_path / 'cache'}",
                            "model=mlp_vae", "model.hidden_dim=32"), run)
    moved = shutil.copytree(colour_folder, tmp_path / "moved")
    # as `python run.py task=evaluate evaluate.checkpoint=RUN data=image_folder data.path=MOVED` gives them
    monkeypatch.setattr(evaluate_module, "_data_overrides_on_command_line", lambda: {"", "path"})
    run_task(compose_config("task=evaluate", f"evaluate.checkpoint={run}", "data=image_folder", f"data.path={moved}",
                            "evaluate=light"), tmp_path / "evaluated")
    report = json.loads((tmp_path / "evaluated" / "results" / "metrics.json").read_text())
    assert report["data"] == "moved" and report["test_images"] == 6


def test_an_npz_of_another_size_trains_and_evaluates_and_other_data_is_refused(digits_npz, tmp_path):
    run = tmp_path / "run"
    run_task(compose_config("data=arrays", f"data.path={digits_npz}", *RUN), run)
    report = json.loads((run / "results" / "metrics.json").read_text())
    assert report["data"] == "digits" and report["test_images"] == 40 and np.isfinite(report["iw_nll"])
    other = save_npz(tmp_path / "other.npz", x_train=np.zeros((8, 1, 12, 12), np.uint8), x_test=np.zeros((8, 1, 12, 12), np.uint8))
    with pytest.raises(CheckpointError, match=r"trained on images of shape \[1, 20, 20\] .* has \[1, 12, 12\]"):
        run_task(compose_config("task=evaluate", f"evaluate.checkpoint={run}", "data=arrays", f"data.path={other}"), tmp_path / "e")
    continuous = save_npz(tmp_path / "c.npz", x_train=np.full((8, 1, 20, 20), 0.3, np.float32), x_test=np.full((8, 1, 20, 20), 0.3, np.float32))
    with pytest.raises(CheckpointError, match="trained on 8bit images, and the data given now .* is continuous"):
        run_task(compose_config("task=evaluate", f"evaluate.checkpoint={run}", "data=arrays", f"data.path={continuous}"), tmp_path / "f")


@pytest.mark.parametrize("overrides, message", [
    (["data=shapes", "data.train_size=0"], "data (vae_lab.data.shapes.make_shapes) refuses these settings: train_size and test_size must be >= 1"),
    (["data=image_folder", "data.path=.", "data.channels=2"], "data (vae_lab.data.folder.load_image_folder) refuses these settings: channels must be 1, 3"),
])
def test_a_loaders_own_refusal_is_one_line_naming_the_data_group(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_task(compose_config(*overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_path_is_one_line_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"data.path is not set: give it on the command line, e.g. data.path=\.\.\."):
        run_task(compose_config("data=arrays"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


USER_LOADER = textwrap.dedent('''
    import torch
    from vae_lab.data import ImageData


    def noise_images(count: int = 64, size: int = 20, limit: int | None = None) -> ImageData:
        """A user's own data set: seeded noise, 3 x size x size, two classes."""
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(count, 3, size, size, generator=generator)
        labels = torch.arange(count) % 2
        return ImageData("noise", images, labels, images[: count // 4], labels[: count // 4], values="continuous")
''')


def test_a_users_own_loader_is_one_function_trusted_by_its_module(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(USER_LOADER)
    monkeypatch.syspath_prepend(str(tmp_path))
    loader = ["data._target_=my_data.noise_images", "~data.name", "~data.root", "~data.download", "~data.fallback",
              "~data.binarize", "+data.count=64"]
    try:
        with pytest.raises(ConfigError, match="my_data is not a trusted module"):
            run_task(compose_config(*loader, *RUN), tmp_path / "refused")
        assert "my_data" not in sys.modules
        run = tmp_path / "run"
        run_task(compose_config(*loader, *RUN, "trusted_modules=[my_data]", "model.latent_dim=3"), run)
        report = json.loads((run / "results" / "metrics.json").read_text())
        assert report["data"] == "noise" and report["latent_dim"] == 3
        evaluated = tmp_path / "evaluated"
        run_task(compose_config("task=evaluate", "trusted_modules=[my_data]", f"evaluate.checkpoint={run}"), evaluated)
        assert json.loads((evaluated / "results" / "metrics.json").read_text())["neg_elbo"] == pytest.approx(report["neg_elbo"])
    finally:
        sys.modules.pop("my_data", None)


def _has_colour(path) -> bool:
    with Image.open(path) as png:
        pixels = np.asarray(png.convert("RGB")).astype(int)
    return bool((pixels.max(2) - pixels.min(2) > 80).mean() > 0.01)


def _escape(text: str) -> str:
    import re

    return re.escape(text).replace(r"\.\*", ".*")


def test_shapes_with_the_discretized_logistic_report_bits_per_dimension(tmp_path):
    run = tmp_path / "run"
    run_task(compose_config("data=shapes", "data.train_size=64", "data.test_size=32", "loss.reconstruction=discretized_logistic",
                            *RUN, "figures=false"), run)
    report = json.loads((run / "results" / "metrics.json").read_text())
    assert report["true_log_likelihood"] is True and report["data_values"] == "8bit" and report["image_shape"] == [3, 32, 32]
    assert report["bits_per_dim"] == pytest.approx(report["neg_elbo"] / (3 * 32 * 32 * np.log(2)))
    assert report["iw_bits_per_dim"] == pytest.approx(report["iw_nll"] / (3 * 32 * 32 * np.log(2)))
    assert 0 < report["iw_bits_per_dim"] <= report["bits_per_dim"] + 1e-3 < 8.5  # at most about a uniform model's 8 bits
    last = read_metrics(run)[-1]  # metrics.csv gives the same number for the test -ELBO every epoch
    assert float(last["test_bits_per_dim"]) == pytest.approx((float(last["test_recon"]) + float(last["test_kl"])) / (3 * 32 * 32 * np.log(2)))
    mnist = tmp_path / "mnist"  # the same likelihood on MNIST's intensities (256 levels too), with bce's printout untouched
    run_task(compose_config("loss.reconstruction=discretized_logistic", *RUN, "figures=false", "data.limit=64"), mnist)
    assert "bits_per_dim" in json.loads((mnist / "results" / "metrics.json").read_text())


USER_LIKELIHOOD = textwrap.dedent('''
    import torch
    from vae_lab.likelihoods import Likelihood

    class Laplace(Likelihood):
        """A Laplace density around sigmoid(output), of a fixed scale."""
        name = "laplace"

        def __init__(self, scale: float = 0.1):
            super().__init__()
            self.scale = scale

        def log_prob(self, x, output):
            return -((x - torch.sigmoid(output)).abs() / self.scale + torch.log(torch.tensor(2 * self.scale))).sum((-3, -2, -1))

        def is_true_log_likelihood(self, binary_data, values="8bit"):
            return True
''')


def test_a_likelihood_is_a_node_with_arguments_and_a_users_own_is_one_class_trusted_by_its_module(tmp_path, monkeypatch):
    node = "loss.reconstruction={_target_:vae_lab.likelihoods.DiscretizedLogistic,components:2}"
    shapes = ["data=shapes", "data.train_size=64", "data.test_size=32", "figures=false"]
    run = tmp_path / "logistic"
    run_task(compose_config(node, *shapes, *RUN, "figures=false"), run)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["config"]["loss"]["reconstruction"] == {"_target_": "vae_lab.likelihoods.DiscretizedLogistic", "components": 2}
    last_layer = [v for k, v in state["model"].items() if k.startswith("decoder") and k.endswith("weight")][-1]
    assert last_layer.shape[1] == 3 * 2 * 3  # ConvTranspose2d (in, out, ...): 3 channels x 2 components x 3 parameters
    report = json.loads((run / "results" / "metrics.json").read_text())
    assert report["reconstruction_loss"] == "discretized_logistic" and "bits_per_dim" in report
    evaluated = tmp_path / "evaluated"  # the checkpoint rebuilds the node's likelihood from its own config
    run_task(compose_config("task=evaluate", f"evaluate.checkpoint={run}", "evaluate.sample_metrics=false"), evaluated)
    assert json.loads((evaluated / "results" / "metrics.json").read_text())["neg_elbo"] == pytest.approx(report["neg_elbo"])
    refusals = {  # the class must be a likelihood, its arguments its own, its module trusted
        "loss.reconstruction={_target_:vae_lab.priors.NormalPrior}": "which is not a vae_lab.likelihoods.Likelihood class",
        "loss.reconstruction={_target_:vae_lab.likelihoods.DiscretizedLogistic,levels:3}": "got an unexpected keyword argument 'levels'",
        "loss.reconstruction={_target_:my_likelihood.Laplace}": "my_likelihood is not a trusted module",
        "loss.reconstruction={_target_:os.system,command:ls}": "os is not a trusted module",
    }
    (tmp_path / "my_likelihood.py").write_text(USER_LIKELIHOOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        for override, message in refusals.items():
            with pytest.raises(ConfigError, match=re.escape(message)):
                run_task(compose_config(override, *RUN), tmp_path / "refused")
        assert "my_likelihood" not in sys.modules and not (tmp_path / "refused" / "checkpoints").exists()
        mine = tmp_path / "mine"
        run_task(compose_config("loss.reconstruction={_target_:my_likelihood.Laplace,scale:0.2}", "trusted_modules=[my_likelihood]",
                                *RUN, "figures=false", "data.limit=64"), mine)
        report = json.loads((mine / "results" / "metrics.json").read_text())
        assert report["reconstruction_loss"] == "laplace" and report["true_log_likelihood"] is True
        with pytest.raises(CheckpointError, match="my_likelihood is not a trusted module"):  # a checkpoint names it too
            run_task(compose_config("task=evaluate", f"evaluate.checkpoint={mine}"), tmp_path / "untrusted")
    finally:
        sys.modules.pop("my_likelihood", None)


# --- data=cifar10 | svhn | celeba: torchvision's classes over files under data.root -------------------

from conftest import DATA_ROOT  # noqa: E402

TORCHVISION_FILES = {"cifar10": "cifar-10-batches-py/test_batch", "svhn": "svhn/test_32x32.mat", "celeba": "celeba/img_align_celeba"}


@pytest.mark.parametrize("name", ["cifar10", "svhn", "celeba"])
def test_a_torchvision_set_without_its_files_names_the_folder_to_put_them_in(tmp_path, name):
    folder = {"cifar10": "cifar-10-batches-py", "svhn": "svhn", "celeba": "celeba"}[name]
    with pytest.raises(DataNotFoundError, match=re.escape(f"data={name}: not found, or damaged")) as error:
        run_task(compose_config(f"data={name}", f"data.root={tmp_path}", *RUN), tmp_path / "run")
    assert f"under {tmp_path / folder}: put " in str(error.value) and "download=True" not in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


class FakeCIFAR10:
    """torchvision.datasets.CIFAR10's attributes as its reader leaves them: data (N, 32, 32, 3) uint8, targets a list."""

    def __init__(self, root, train=True, download=False):
        assert not download
        generator = torch.Generator().manual_seed(int(train))
        self.data = torch.randint(0, 256, (96 if train else 40, 32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
        self.targets = [i % 10 for i in range(len(self.data))]


class FakeSVHN:
    """torchvision.datasets.SVHN's attributes: data (N, 3, 32, 32) uint8, labels 0..9 as a numpy array."""

    def __init__(self, root, split="train", download=False):
        assert not download and split in ("train", "test")
        self.data = np.full((20, 3, 32, 32), 255, dtype=np.uint8)
        self.labels = np.arange(20) % 10


class FakeCelebA:
    """torchvision.datasets.CelebA's items: (a 178 x 218 PIL image, the target: None for target_type=[])."""

    def __init__(self, root, split="train", target_type=(), download=False):
        assert target_type == [] and not download
        self.count = 12 if split == "train" else 6

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        pixels = np.zeros((218, 178, 3), dtype=np.uint8)
        pixels[:, :, index % 3] = 255  # one colour per image: the crop and resize keep it
        return Image.fromarray(pixels), None


def test_the_cifar10_svhn_and_celeba_readers_give_colour_images_in_0_1_with_their_classes_and_train(tmp_path, monkeypatch):
    from torchvision import datasets

    from vae_lab.data.torchvision_sets import load_torchvision_set

    monkeypatch.setattr(datasets, "CIFAR10", FakeCIFAR10)
    monkeypatch.setattr(datasets, "CelebA", FakeCelebA)
    monkeypatch.setattr(datasets, "SVHN", FakeSVHN)
    digits = load_torchvision_set("svhn", tmp_path)
    assert digits.image_shape == (3, 32, 32) and as_float(digits.train_images).min() == 1.0 and digits.class_names[:2] == ("0", "1")
    cifar = load_torchvision_set("cifar10", tmp_path, limit=50)
    expected = torch.from_numpy(FakeCIFAR10(tmp_path, train=True).data[:50]).permute(0, 3, 1, 2)
    assert torch.equal(cifar.train_images, expected) and cifar.image_shape == (3, 32, 32) and len(cifar.test_images) == 40
    assert cifar.train_labels.tolist() == [i % 10 for i in range(50)] and cifar.class_names[0] == "airplane"
    faces = load_torchvision_set("celeba", tmp_path, image_size=16, limit=5)
    assert faces.image_shape == (3, 16, 16) and len(faces.train_images) == 5 and not faces.labelled
    assert torch.equal(as_float(faces.train_images[1]).amax((1, 2)), torch.tensor([0.0, 1.0, 0.0]))  # the green face stays green
    run = tmp_path / "run"
    run_task(compose_config("data=cifar10", f"data.root={tmp_path}", *RUN, "figures=false"), run)
    report = json.loads((run / "results" / "metrics.json").read_text())
    assert report["data"] == "cifar10" and report["image_shape"] == [3, 32, 32] and report["test_images"] == 40


@pytest.mark.parametrize("name", ["cifar10", "svhn", "celeba"])
def test_a_torchvision_set_whose_files_are_here_loads(name):
    if not (DATA_ROOT / TORCHVISION_FILES[name]).exists():
        pytest.skip(f"{name}: no {TORCHVISION_FILES[name]} under {DATA_ROOT} (this machine has none, and nothing downloads); "
                    "the readers are checked on torchvision's objects above")
    from vae_lab.data.torchvision_sets import load_torchvision_set

    data = load_torchvision_set(name, DATA_ROOT, limit=8)
    assert data.train_images.shape[1] == 3 and 0 <= data.train_images.min() <= data.train_images.max() <= 1


def test_a_last_batch_of_one_image_is_left_out_of_a_batchnorm_epoch_and_one_image_alone_is_one_line():
    from vae_lab.engine import run_epoch
    from vae_lab.model import ConvVAE, MLPVAE
    from vae_lab.objectives import ELBO

    images = as_float(make_shapes(train_size=65, test_size=1, image_size=20).train_images)  # 65 = 64 + 1
    model, plain = ConvVAE(latent_dim=2, image_shape=(3, 20, 20)), MLPVAE(latent_dim=2, hidden_dim=8, image_shape=(3, 20, 20))
    for network in (model, plain):
        result = run_epoch(network, ELBO(), images, 64, optimizer=torch.optim.Adam(network.parameters()),
                           generator=torch.Generator().manual_seed(0))
        assert all(np.isfinite(value) for value in result.values())
    with pytest.raises(VaeLabError, match="one training image cannot train ConvVAE, whose BatchNorm layers need two or more"):
        run_epoch(model, ELBO(), images[:1], 64, optimizer=torch.optim.Adam(model.parameters()), generator=torch.Generator())
