"""Sample quality: the feature classifier and its cache, the metrics, the samplers, the evaluate wiring."""
import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from vae_lab import sample_quality
from vae_lab.cli import run_task
from vae_lab.checkpoint import tensors_digest
from vae_lab.data import load_dataset
from vae_lab.errors import ConfigError
from vae_lab.options import LIKELIHOOD_METRICS, sample_metric_keys
from vae_lab.sample_quality import cached_classifier, features_and_classes, fidelity, kl_to_uniform, train_classifier
from vae_lab.samplers import GaussianMixtureSampler
from vae_lab.sweep import write_summary
from vae_lab.validate import validate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset("mnist_5k", limit=256)


@pytest.fixture(scope="module")
def tiny_classifier(tiny_data, tmp_path_factory):
    network, _ = cached_classifier(tiny_data, tmp_path_factory.mktemp("cache"), CPU, batch_size=128)
    return network


def test_metrics_of_a_set_against_itself_are_perfect(tiny_data, tiny_classifier):
    features, _ = features_and_classes(tiny_classifier, tiny_data.test_images, 128)
    noise, _ = features_and_classes(tiny_classifier, torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0)), 128)
    itself, against_noise = fidelity(features, features, seed=0), fidelity(noise, features, seed=0)
    assert abs(itself["fid"]) < 1e-6 * against_noise["fid"]
    assert abs(itself["kid"]) < 0.01 * against_noise["kid"]
    assert itself["precision"] == itself["recall"] == 1.0


def test_the_floor_is_below_images_of_noise(tiny_data, tiny_classifier):
    real, _ = features_and_classes(tiny_classifier, tiny_data.test_images, 128)
    floor, _ = features_and_classes(tiny_classifier, tiny_data.train_images, 128)
    noise, _ = features_and_classes(tiny_classifier, torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0)), 128)
    floor_metrics, noise_metrics = fidelity(floor, real, seed=0), fidelity(noise, real, seed=0)
    assert floor_metrics["fid"] < noise_metrics["fid"] / 5 and floor_metrics["kid"] < noise_metrics["kid"] / 5
    assert floor_metrics["precision"] > 0.5 > noise_metrics["precision"]
    assert floor_metrics["recall"] > 0.5 > noise_metrics["recall"]


def test_class_kl_is_zero_for_uniform_classes_and_log_k_for_one():
    assert kl_to_uniform(torch.tensor([5] * 10).numpy()) == pytest.approx(0.0)
    assert kl_to_uniform(torch.tensor([50] + [0] * 9).numpy()) == pytest.approx(torch.log(torch.tensor(10.0)).item())


def test_the_classifier_is_seeded(tiny_data):
    torch.manual_seed(123)  # the global RNG must not matter, and must not be consumed
    state = torch.get_rng_state()
    first = train_classifier(tiny_data.train_images, tiny_data.train_labels, 10, CPU)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)
    second = train_classifier(tiny_data.train_images, tiny_data.train_labels, 10, CPU)
    images = tiny_data.test_images[:64]
    assert torch.equal(features_and_classes(first, images, 64)[0], features_and_classes(second, images, 64)[0])


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 20, 20), (1, 5, 7)])
def test_the_classifier_takes_images_of_any_shape(shape):
    images = torch.rand(64, *shape, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(64) % 10
    network = train_classifier(images, labels, 10, CPU)
    features, classes = features_and_classes(network, images, 32)
    assert features.shape == (64, sample_quality.FEATURES) and classes.shape == (64,)


def test_the_cache_is_reused_invalidated_by_other_data_and_rebuilt_when_corrupt(tiny_data, tmp_path, monkeypatch, caplog):
    trained = []
    real_training = sample_quality.train_classifier
    monkeypatch.setattr(sample_quality, "train_classifier", lambda *args: trained.append(1) or real_training(*args))

    _, first = cached_classifier(tiny_data, tmp_path, CPU, 128)
    _, again = cached_classifier(tiny_data, tmp_path, CPU, 128)
    assert (first["cached"], again["cached"], len(trained)) == (False, True, 1)
    assert again["test_accuracy"] == first["test_accuracy"] and again["path"] == first["path"]

    other = load_dataset("mnist_5k", limit=256, binarize="static")  # same images, binarized: another data set
    _, other_info = cached_classifier(other, tmp_path, CPU, 128)
    assert not other_info["cached"] and other_info["path"] != first["path"] and len(trained) == 2

    with open(first["path"], "r+b") as file:  # damage the first file
        file.seek(100)
        file.write(b"\x00" * 64)
    with caplog.at_level(logging.WARNING):
        _, rebuilt = cached_classifier(tiny_data, tmp_path, CPU, 128)
    assert not rebuilt["cached"] and len(trained) == 3
    assert "training it again" in caplog.text and first["path"] in caplog.text
    assert cached_classifier(tiny_data, tmp_path, CPU, 128)[1]["cached"]  # the rebuilt file is good


@pytest.mark.parametrize("damage, cause", [
    ("nan weight", "NaN or infinite weights"),
    ("one flipped bit", "do not match their digest"),
    ("a pickle", "not a file vae_lab wrote"),
])
def test_a_damaged_classifier_cache_is_retrained_with_one_line_that_never_advises_unsafe_loading(
        tiny_data, tmp_path, caplog, damage, cause):
    _, first = cached_classifier(tiny_data, tmp_path, CPU, 128)
    state = torch.load(first["path"], weights_only=True)
    name = next(k for k, t in state["weights"].items() if t.is_floating_point() and t.numel() > 1)
    if damage == "nan weight":
        state["weights"][name].view(-1)[0] = float("nan")
        state["weights_sha256"] = tensors_digest(state["weights"])  # a digest that matches: the NaN check must speak
        torch.save(state, first["path"])
    elif damage == "one flipped bit":
        state["weights"][name].view(-1).view(torch.int32)[0] ^= 1 << 3
        torch.save(state, first["path"])
    else:
        import pickle
        Path(first["path"]).write_bytes(pickle.dumps(Path("/"), protocol=2))  # a global pickle: torch refuses it with its advice
    with caplog.at_level(logging.WARNING):
        network, rebuilt = cached_classifier(tiny_data, tmp_path, CPU, 128)
    assert not rebuilt["cached"] and cause in caplog.text
    assert "weights_only=False" not in caplog.text and len(caplog.text.strip().splitlines()) == 1
    assert all(torch.isfinite(t).all() for t in network.state_dict().values() if t.is_floating_point())


def test_a_file_made_for_other_data_is_not_loaded(tiny_data, tmp_path, caplog):
    _, info = cached_classifier(tiny_data, tmp_path, CPU, 128)
    other = load_dataset("mnist_5k", limit=128)
    _, other_info = cached_classifier(other, tmp_path, CPU, 128)
    shutil.copyfile(info["path"], other_info["path"])  # e.g. a file copied between machines under another name
    with caplog.at_level(logging.WARNING):
        assert not cached_classifier(other, tmp_path, CPU, 128)[1]["cached"]
    assert "made for other data" in caplog.text


def test_gmm_sampler_is_seeded_and_follows_the_codes():
    generator = torch.Generator().manual_seed(0)
    codes = torch.cat([torch.randn(500, 2, generator=generator) * 0.1 + 5, torch.randn(500, 2, generator=generator) * 0.1 - 5])
    sampler = GaussianMixtureSampler(codes, components=2, seed=0)
    z = sampler.latents(1000, torch.Generator().manual_seed(1))
    assert z.shape == (1000, 2) and z.dtype == torch.float32
    assert torch.equal(z, sampler.latents(1000, torch.Generator().manual_seed(1)))
    assert not torch.equal(z, sampler.latents(1000, torch.Generator().manual_seed(2)))
    assert ((z - 5).norm(dim=1) < 1).float().mean() == pytest.approx(0.5, abs=0.06)  # both modes, none between
    assert ((z + 5).norm(dim=1) < 1).float().mean() == pytest.approx(0.5, abs=0.06)
    assert (z[:500, 0] > 0).float().mean() == pytest.approx(0.5, abs=0.1)  # shuffled, not grouped by component


def test_every_metric_reaches_metrics_json_the_log_and_summary_csv(make_cfg, tmp_path):
    job = tmp_path / "sweep" / "0"
    run_task(make_cfg("train.epochs=1", "train.evaluate_at_end=true", "evaluate.sample_metrics=true", "evaluate.sample_count=200", "figures=true"), job)
    results = job / "results"
    report = json.loads((results / "metrics.json").read_text())
    keys = (*LIKELIHOOD_METRICS, *sample_metric_keys())  # the one list the report, summary and MLflow share
    assert set(keys) <= set(report) and all(isinstance(report[key], (int, float)) for key in keys)
    assert report["sample_metric_images"] == 200 and report["samplers"] == ["prior", "gmm"]
    assert report["fid_floor"] < report["fid_prior"] and 0 <= report["precision_gmm"] <= 1
    assert sum(report["class_histograms"]["gmm"]) == 200
    for name in ("random_generation.png", "random_generation_gmm.png", "class_coverage.png"):
        assert (results / name).is_file(), name
    log = (job / "run.log").read_text()
    assert "sample quality: 200 images per set" in log
    assert report["sample_metrics_caveat"].startswith("compare them with care: 200 images per set (under 1,000")
    assert f"caveat: {report['sample_metrics_caveat']}" in log  # said where the numbers are printed
    (job / ".hydra").mkdir()
    (job / ".hydra" / "overrides.yaml").write_text("- train.epochs=1\n")
    write_summary(tmp_path / "sweep")
    with (tmp_path / "sweep" / "summary.csv").open() as file:
        row = next(csv.DictReader(file))
    for key in keys:
        assert float(row[key]) == pytest.approx(report[key]), key
    assert "fid_gmm" in (tmp_path / "sweep" / "summary.md").read_text()


def test_sample_metrics_are_flagged_when_the_sets_or_the_classifier_are_too_small_to_mean_much():
    from vae_lab.sample_report import caveat

    assert caveat(10_000, 0.991) is None and caveat(1_000, 0.9) is None
    assert "999 images per set" in caveat(999, 0.99) and "classifier" not in caveat(999, 0.99)
    both = caveat(512, 0.49)
    assert "512 images per set" in both and "test accuracy is 49.0 %" in both and "evaluate.sample_count" in both


def test_samplers_and_the_switch(make_cfg, tmp_path):
    run_task(make_cfg("train.epochs=1", "train.evaluate_at_end=true", "evaluate.samplers=[prior]", "evaluate.sample_metrics=false", "figures=true"), tmp_path)
    results = tmp_path / "results"
    report = json.loads((results / "metrics.json").read_text())
    assert not set(sample_metric_keys()) & set(report)
    assert (results / "random_generation.png").is_file()
    assert not (results / "random_generation_gmm.png").exists() and not (results / "class_coverage.png").exists()


@pytest.mark.parametrize("override, message", [
    ("evaluate.samplers=[prior,vamp]", "evaluate.samplers=['prior', 'vamp'] is not allowed: use a list of distinct names from prior, gmm"),
    ("evaluate.samplers=gmm", "evaluate.samplers='gmm' is not allowed: use a list of distinct names from prior, gmm"),
    ("evaluate.samplers=[gmm,gmm]", "is not allowed: use a list of distinct names"),
    ("evaluate.gmm_components=0", "evaluate.gmm_components=0 is not allowed: use a whole number >= 1"),
    ("evaluate.sample_count=5", "evaluate.sample_count=5 is not allowed: use a whole number >= 10"),
    ("evaluate.sample_metrics=maybe", "evaluate.sample_metrics='maybe' is not allowed: use true or false"),
])
def test_sample_settings_are_validated(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(make_cfg(override))


def test_a_mixture_too_large_for_memory_is_left_out_before_it_is_fitted():
    from vae_lab.samplers import SamplerUnavailable

    with pytest.raises(SamplerUnavailable, match=r"10 full 12000 x 12000 covariances need about 42\.9 GiB .*lower evaluate.gmm_components"):
        GaussianMixtureSampler(torch.zeros(20, 12000), components=10, seed=0)  # refused before scikit-learn allocates
