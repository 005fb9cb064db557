"""The allowed values of the settings that take a name: one place, importable without torch.

The modules that act on a setting import its choices from here, and so does the
config validation, which runs before torch is even imported.
"""

TASKS = ("train", "evaluate", "summarize")
DATASETS = ("mnist", "fashion_mnist", "mnist_5k")
BINARIZE = ("none", "static", "dynamic")
RECONSTRUCTIONS = ("bce", "mse")
EMBEDDINGS = ("pca", "tsne")
N_COMPONENTS = (2, 3)
RETURN_METRICS = ("test_loss", "test_neg_elbo")
SAMPLERS = ("prior", "gmm")
# The image sets every sample metric is computed for: each sampler's images, the decoded
# posterior means of the test images, and the floor (a part of the training set).
SAMPLE_SETS = (*SAMPLERS, "reconstruction", "floor")
SAMPLE_METRICS = ("fid", "kid", "precision", "recall", "class_kl")


def sample_metric_keys() -> tuple[str, ...]:
    """The sample-quality keys of metrics.json (the sweep summary reads them): `<metric>_<set>` and two more."""
    return (*(f"{metric}_{name}" for name in SAMPLE_SETS for metric in SAMPLE_METRICS),
            "latent_probe_accuracy", "classifier_test_accuracy")
