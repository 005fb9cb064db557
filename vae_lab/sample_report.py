"""The sample-quality part of an evaluation: each sampler's figure, and metrics that read against real data.

For every sampler, for the reconstructions of the test images, and for the floor (an
equally large part of the training set), the images are compared with the test images
in the features of the data set's own classifier: FID, KID, precision, recall, and the
KL of their predicted classes to the uniform distribution. The floor is what real data
scores, so every other number reads against it. The latent probe says how much class
information the posterior means hold.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from vae_lab import plots
from vae_lab.data import as_float
from vae_lab.metrics import encode_all
from vae_lab.options import SAMPLE_METRICS
from vae_lab.sample_quality import PR_NEIGHBOURS, cached_classifier, class_histogram, features_and_classes, fidelity, kl_to_uniform, latent_probe
from vae_lab.samplers import SamplerUnavailable, decode_images, make_sampler

log = logging.getLogger(__name__)


def sample_quality(
    model,
    data,
    test_means: torch.Tensor,
    folder: Path,
    *,
    samplers: list[str],
    gmm_components: int,
    sample_count: int,
    sample_metrics: bool,
    batch_size: int,
    cache_dir: str,
    seed: int,
    generation_samples: int,
    images_per_row: int,
    figures: bool = True,
) -> dict:
    """Draw random_generation_<sampler>.png for every sampler but the prior (whose figure is
    random_generation.png); with sample_metrics, measure and return the metrics (else {}).

    test_means: posterior means (N_test, latent_dim) of data.test_images.
    """
    seconds: dict[str, float] = {}
    with _timed(seconds, "encode_train"):
        train_means = encode_all(model, data.train_images, batch_size)[0] if "gmm" in samplers else None
    with _timed(seconds, "fit_samplers"):
        fitted = _fit_samplers(samplers, model, train_means, gmm_components, seed)
    for name, sampler in fitted.items():
        if figures and name != "prior":  # the prior's figure is the reference's random_generation.png
            z = sampler.latents(generation_samples, torch.Generator().manual_seed(seed))
            plots.image_grid(decode_images(model, z, batch_size), folder / f"random_generation_{name}.png", nrow=images_per_row,
                             title=f"Random generation: decoded z from the {name} sampler, latent_dim={model.latent_dim}")
    if not sample_metrics:
        return {}

    if not data.labelled or len(data.class_names) < 2:
        # The features come from a classifier of the data set's own classes: without classes there is none.
        log.warning("sample metrics left out: %s has no class labels, and FID / KID / precision-recall here are measured "
                    "in the features of a classifier of its classes (give labels, e.g. class folders)", data.name)
        return {}
    n = min(sample_count, len(data.test_images), len(data.train_images))
    if n <= PR_NEIGHBOURS + 1:
        log.warning("sample metrics skipped: %d test images are too few for precision and recall with k = %d", n, PR_NEIGHBOURS)
        return {}
    device = data.test_images.device
    with _timed(seconds, "classifier"):  # loading it, or training it once per data set
        network, classifier = cached_classifier(data, cache_dir, device, batch_size)
    with _timed(seconds, "generate"):
        sets = {name: decode_images(model, sampler.latents(n, torch.Generator().manual_seed(seed)), batch_size)
                for name, sampler in fitted.items()}
        sets["reconstruction"] = decode_images(model, test_means[:n], batch_size)
        floor_rows = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(seed))[:n]
        sets["floor"] = as_float(data.train_images[floor_rows.to(device)])
        if data.dynamic_binarization:  # the stored train split holds intensities; the test split a binary draw
            sets["floor"] = torch.bernoulli(sets["floor"].cpu(), generator=torch.Generator().manual_seed(seed)).to(device)
    with _timed(seconds, "features"):
        real_features, _ = features_and_classes(network, data.test_images[:n], batch_size)
        measured = {name: features_and_classes(network, images, batch_size) for name, images in sets.items()}
    report = {"sample_metric_images": n, "samplers": list(fitted)}
    histograms = {}
    with _timed(seconds, "fidelity"):
        for name, (features, classes) in measured.items():
            histograms[name] = class_histogram(classes, len(data.class_names))
            values = {**fidelity(features, real_features, seed), "class_kl": kl_to_uniform(histograms[name])}
            report.update({f"{metric}_{name}": values[metric] for metric in SAMPLE_METRICS})
    report["class_histograms"] = {name: counts.tolist() for name, counts in histograms.items()}
    if figures:
        plots.class_coverage(histograms, data.class_names, folder / "class_coverage.png",
                             title=f"Class coverage: predicted classes of {n} images per set (floor: training images)")
    with _timed(seconds, "latent_probe"):
        if train_means is None:
            train_means = encode_all(model, data.train_images, batch_size)[0]
        report["latent_probe_accuracy"] = latent_probe(train_means, data.train_labels, test_means, data.test_labels, seed)
    report["classifier_test_accuracy"] = classifier["test_accuracy"]
    report["sample_metrics_caveat"] = caveat(n, classifier["test_accuracy"])
    if report["sample_metrics_caveat"]:
        log.warning("sample metrics: %s", report["sample_metrics_caveat"])
    report["classifier_cached"] = classifier["cached"]
    report["classifier_train_seconds"] = round(classifier["train_seconds"], 3)
    report["sample_quality_seconds"] = {name: round(value, 3) for name, value in seconds.items()}
    report["sample_quality_seconds"]["total"] = round(sum(seconds.values()), 3)
    return report


# Below these the sample metrics are printed but flagged: FID's 64 x 64 feature covariance is biased well above its
# large-sample value on a few hundred images, and a classifier that misreads many test images gives features (and
# class coverage) that do not tell its classes apart.
MIN_SAMPLE_IMAGES = 1000
MIN_CLASSIFIER_ACCURACY = 0.9


def caveat(images: int, classifier_accuracy: float) -> str | None:
    """Why these sample metrics may not mean much (None when the sets and the classifier are big and good enough)."""
    reasons = ([f"{images} images per set (under {MIN_SAMPLE_IMAGES:,}, FID and KID are biased and noisy)"]
               if images < MIN_SAMPLE_IMAGES else [])
    if classifier_accuracy < MIN_CLASSIFIER_ACCURACY:
        reasons.append(f"the feature classifier's test accuracy is {100 * classifier_accuracy:.1f} % (under "
                       f"{100 * MIN_CLASSIFIER_ACCURACY:.0f} %, its features barely tell the classes apart)")
    return ("compare them with care: " + "; ".join(reasons) + ". More data (evaluate.sample_count, data.limit) lifts both.") if reasons else None


def log_sample_quality(report: dict) -> None:
    """The sample-quality table for the console and run.log (nothing when the block was off)."""
    if "sample_metric_images" not in report:
        return
    names = [*report["samplers"], "reconstruction", "floor"]
    lines = [
        f"sample quality: {report['sample_metric_images']} images per set vs as many test images, in the features of the "
        f"{report['data']} classifier (test accuracy {100 * report['classifier_test_accuracy']:.2f} %)",
        f"  {'set':<16}{'FID':>10}{'KID':>10}{'precision':>11}{'recall':>8}{'class KL':>10}",
    ]
    for name in names:
        label = "floor (train)" if name == "floor" else name
        lines.append(f"  {label:<16}{report[f'fid_{name}']:>10.3f}{report[f'kid_{name}']:>10.4f}"
                     f"{report[f'precision_{name}']:>11.3f}{report[f'recall_{name}']:>8.3f}{report[f'class_kl_{name}']:>10.4f}")
    lines.append(f"  latent probe (logistic regression on posterior means): test accuracy {100 * report['latent_probe_accuracy']:.2f} %")
    lines.append(f"  seconds: {report['sample_quality_seconds']}")
    if report.get("sample_metrics_caveat"):
        lines.append(f"  caveat: {report['sample_metrics_caveat']}")
    log.info("\n".join(lines))


def _fit_samplers(names: list[str], model, train_means, components: int, seed: int) -> dict:
    """The samplers that can be fitted to what there is; the others are named with why, and left out."""
    fitted = {}
    for name in names:
        try:
            fitted[name] = make_sampler(name, model, train_means=train_means, components=components, seed=seed)
        except SamplerUnavailable as why:
            log.warning("the %s sampler is left out (no random_generation_%s.png, no metrics): %s", name, name, why)
    return fitted


@contextmanager
def _timed(seconds: dict[str, float], part: str):
    """Add the wall time of the with-block to seconds[part]."""
    started = time.perf_counter()
    yield
    seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - started
