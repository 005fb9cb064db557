"""The allowed values of the settings that take a name: one place, importable without torch.

The modules that act on a setting import its choices from here, and so does the
config validation, which runs before torch is even imported.
"""

TASKS = ("train", "evaluate", "summarize")
DATASETS = ("mnist", "fashion_mnist", "mnist_5k")
BINARIZE = ("none", "static", "dynamic")
RECONSTRUCTIONS = ("bce", "mse", "continuous_bernoulli", "gaussian")
EMBEDDINGS = ("pca", "tsne")
N_COMPONENTS = (2, 3)
RETURN_METRICS = ("test_loss", "test_neg_elbo")
