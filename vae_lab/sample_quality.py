"""The data set's own feature network, and the sample metrics measured in its features.

FID through ImageNet Inception features says little about 28x28 digits, so the
features come from a small CNN classifier trained on the run's own training split.
It is trained once per data set and binarization and cached, keyed by a hash of the
data itself, so another data set never reuses it. FID, KID and precision/recall
(Kynkaanniemi et al. 2019) come from torch-fidelity, on the classifier's penultimate
features; class coverage and the latent probe from scipy and scikit-learn.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vae_lab.data import ImageData, as_float, image_batches, index_batches
from vae_lab.engine import progress
from vae_lab.files import tensors_digest, write_atomic

log = logging.getLogger(__name__)

# Bump when the architecture or its training changes: cache files of older versions are
# then ignored (their key differs), never loaded into a network they do not fit.
CLASSIFIER_VERSION = 1
# Fixed, not the run's seed: runs with different seeds must be measured with the same network.
CLASSIFIER_SEED = 0
CLASSIFIER_EPOCHS = 3
CLASSIFIER_BATCH_SIZE = 128
CLASSIFIER_LR = 2e-3
FEATURES = 64  # width of the penultimate layer, the space every sample metric is measured in
PR_NEIGHBOURS = 3  # k of the k-NN radii of precision and recall (Kynkaanniemi et al. 2019)
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_BATCH = 2000  # rows of a distance matrix at a time: 2,000 x 10,000 floats = 80 MB


class FeatureClassifier(nn.Module):
    """Two convolution blocks and a fully connected layer: (B, C, H, W) -> (B, FEATURES) -> class logits.

    Small on purpose: trained in about a minute of one CPU core, and 50,000 images
    pass through it in seconds. BatchNorm makes three epochs enough. Images of any size
    reach the same 7 x 7 grid (for 28 x 28 the adaptive pooling is the identity).
    """

    def __init__(self, classes: int = 10, channels: int = 1, features: int = FEATURES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, kernel_size=3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),  # (B, 16, 14, 14)
            nn.Conv2d(16, 32, kernel_size=3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),  # (B, 32, 7, 7)
            nn.AdaptiveMaxPool2d((7, 7)),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, features), nn.ReLU(),  # the penultimate features
        )
        self.head = nn.Linear(features, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def data_key(data: ImageData) -> str:
    """A hash of what the classifier is trained and tested on, and of how it is trained."""
    digest = hashlib.sha256()
    digest.update(f"v{CLASSIFIER_VERSION} seed{CLASSIFIER_SEED} epochs{CLASSIFIER_EPOCHS} {data.binarize}".encode())
    for tensor in (data.train_images, data.train_labels, data.test_images, data.test_labels):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cached_classifier(data: ImageData, cache_dir: str | Path, device: torch.device, batch_size: int) -> tuple[FeatureClassifier, dict]:
    """The feature network for `data`: from cache_dir if a valid file is there, else trained and saved.

    Returns the network (on `device`, in eval mode) and facts about it: test_accuracy,
    train_seconds (of the training that made it), cached (whether it was loaded), path.
    """
    key = data_key(data)
    path = Path(cache_dir).expanduser() / f"classifier-{data.name}-{key[:20]}.pt"
    if path.is_file():
        try:
            network, info = _load_cached(path, key, data)
            return network.to(device).eval(), {**info, "cached": True, "path": str(path)}
        except ValueError as error:  # any unreadable, damaged or foreign file is rebuilt, never trusted
            log.warning("the cached classifier %s is %s; training it again", path, error)
    log.info("training the %s feature classifier (once per data set; cached in %s)", data.name, path.parent)
    started = time.perf_counter()
    network = train_classifier(data.train_images, data.train_labels, len(data.class_names), device)
    train_seconds = time.perf_counter() - started
    accuracy = classifier_accuracy(network, data.test_images, data.test_labels, batch_size)
    log.info("feature classifier: test accuracy %.2f %% after %.1f s of training", 100 * accuracy, train_seconds)
    weights = network.state_dict()
    _save_atomically({"key": key, "weights": weights, "weights_sha256": tensors_digest(weights), "test_accuracy": accuracy,
                      "train_seconds": train_seconds}, path)
    return network.eval(), {"test_accuracy": accuracy, "train_seconds": train_seconds, "cached": False, "path": str(path)}


def train_classifier(images: torch.Tensor, labels: torch.Tensor, classes: int, device: torch.device) -> FeatureClassifier:
    """A new classifier after CLASSIFIER_EPOCHS of Adam on (images, labels): the same network for the same data."""
    # fork_rng: seed the weight initialisation without touching the run's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CLASSIFIER_SEED)
        network = FeatureClassifier(classes=classes, channels=images.shape[1])
    network.to(device).train()
    images, labels = images.to(device), labels.to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=CLASSIFIER_LR)
    steps = CLASSIFIER_EPOCHS * -(-len(images) // CLASSIFIER_BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=CLASSIFIER_LR, total_steps=steps)
    generator = torch.Generator().manual_seed(CLASSIFIER_SEED)
    for _ in progress(range(CLASSIFIER_EPOCHS), "feature classifier", unit="epoch"):
        for batch in index_batches(len(images), CLASSIFIER_BATCH_SIZE, generator=generator, device=device):
            loss = nn.functional.cross_entropy(network(as_float(images[batch])), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return network.eval()


@torch.no_grad()
def classifier_accuracy(network: FeatureClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    predicted = torch.cat([network(batch).argmax(1) for batch in image_batches(images, batch_size)])
    return (predicted == labels.to(predicted.device)).float().mean().item()


@torch.no_grad()
def features_and_classes(network: FeatureClassifier, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (N, FEATURES) on the CPU and predicted classes (N,) of images in [0, 1]."""
    features, classes = [], []
    for batch in progress(image_batches(images, batch_size), "classifier features", total=-(-len(images) // batch_size)):
        h = network.features(batch)
        features.append(h.float().cpu())
        classes.append(network.head(h).argmax(1).cpu())
    return torch.cat(features), torch.cat(classes)


def fidelity(generated: torch.Tensor, real: torch.Tensor, seed: int) -> dict:
    """FID, KID (mean over subsets) and precision/recall of generated vs real features (N, F), by torch-fidelity."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    # float64 for the covariances: their square-root trace cancels to ~0 for equal sets only in double.
    fid = fid_statistics_to_metric(fid_features_to_statistics(generated.double()), fid_features_to_statistics(real.double()), verbose=False)
    kid = kid_features_to_metric(generated, real, kid_subsets=KID_SUBSETS, verbose=False, rng_seed=seed,
                                 kid_subset_size=min(KID_SUBSET_SIZE, len(generated), len(real)))
    prc = prc_features_to_metric(generated, real, prc_neighborhood=PR_NEIGHBOURS, prc_batch_size=PR_BATCH,
                                 save_cpu_ram=True, verbose=False)
    return {"fid": fid[KEY_METRIC_FID], "kid": kid[KEY_METRIC_KID_MEAN],
            "precision": prc[KEY_METRIC_PRECISION], "recall": prc[KEY_METRIC_RECALL]}


def class_histogram(classes: torch.Tensor, n_classes: int) -> np.ndarray:
    return torch.bincount(classes, minlength=n_classes).numpy()


def kl_to_uniform(histogram: np.ndarray) -> float:
    """KL(predicted class frequencies || uniform) in nats: 0 when every class is equally common, log K for one class."""
    from scipy.stats import entropy

    return float(entropy(histogram, np.full(len(histogram), 1.0 / len(histogram))))


def latent_probe(train_means: torch.Tensor, train_labels: torch.Tensor, test_means: torch.Tensor, test_labels: torch.Tensor, seed: int) -> float:
    """Test accuracy of a logistic regression from posterior means to classes: the class information in the code."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=200, random_state=seed))
    probe.fit(train_means.cpu().numpy(), train_labels.cpu().numpy())
    return float(probe.score(test_means.cpu().numpy(), test_labels.cpu().numpy()))


def _load_cached(path: Path, key: str, data: ImageData) -> tuple[FeatureClassifier, dict]:
    """A cached classifier, read as untrusted input: plain tensors only (weights_only), the weights'
    digest, finite values, the data key. ValueError says, in our words, why it cannot be used."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's own message advises unsafe loading: never repeated
        raise ValueError(f"unreadable ({type(error).__name__}), not a file vae_lab wrote") from None
    weights = state.get("weights") if isinstance(state, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise ValueError("not a classifier vae_lab wrote")
    if state.get("key") != key:
        raise ValueError("made for other data")
    if state.get("weights_sha256") != tensors_digest(weights):
        raise ValueError("damaged (its weights do not match their digest)")
    if not all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()):
        raise ValueError("damaged (NaN or infinite weights)")
    network = FeatureClassifier(classes=len(data.class_names), channels=data.image_shape[0])
    try:
        network.load_state_dict(weights)
        info = {"test_accuracy": float(state["test_accuracy"]), "train_seconds": float(state["train_seconds"])}
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"not a classifier for this data ({type(error).__name__})") from None
    return network, info


def _save_atomically(state: dict, path: Path) -> None:
    """Write to a unique temporary name and rename: a killed run never leaves half a cache file."""
    try:
        write_atomic(path, lambda file: torch.save(state, file))
    except OSError as error:  # a read-only cache costs a retraining next time, not this evaluation
        log.warning("cannot cache the feature classifier in %s (%s); set VAE_LAB_CACHE to a writable folder", path.parent, error.strerror or error)
