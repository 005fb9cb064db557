"""Disentanglement metrics: how well each latent dimension captures one generating factor.

Every metric reads codes (N, D), the latent means of N images, and the images' factors
(N, K), the ground truth a data set such as data=shapes carries. Factors are made
discrete first (`factor_levels`): a factor with at most MAX_LEVELS distinct values keeps
them (dSprites' grid: 3 shapes, 6 scales, 40 orientations, 32 x 32 positions); a
continuous one is cut into `bins` equal-count bins. Codes are cut into `bins`
equal-width bins where a metric needs them discrete (MIG), as disentanglement_lib does.

- MIG (Chen et al. 2018): per factor, the gap between the two largest mutual
  informations I(z_d; v_k), divided by the factor's entropy H(v_k); mean over factors.
- DCI (Eastwood & Williams 2018): a random forest per factor predicts it from all codes
  (every dimension a candidate at every split, so importance goes where information is);
  its feature importances R (D, K) give disentanglement (1 - entropy over factors of each
  dimension's row, weighted by the row's share), completeness (1 - entropy over
  dimensions of each factor's column) and informativeness (the forests' held-out
  accuracy; higher is better).
- SAP (Kumar et al. 2018): per factor and dimension, how well that one dimension predicts
  the factor: chance-adjusted balanced accuracy of a depth-limited tree for a
  categorical factor (so that no information scores 0 for any number of classes), R^2 of
  a line for a numeric one; per factor the gap between the best two dimensions; mean.
- FactorVAE score (Kim & Mnih 2018): codes scaled by their standard deviation; for a
  vote, pick a factor, a value of it and `group_size` images sharing that value; the
  dimension of least variance across them votes for the factor. A majority-vote
  classifier (dimension -> factor) fitted on `votes` votes, scored on as many others.
  Images sharing a value are drawn from the data, not rendered anew.

All logs are natural: MI and entropies in nats. scikit-learn fits the forests and trees
and computes mutual information and accuracies; only the metrics' definitions are here.
"""
from __future__ import annotations

import time
import warnings

import numpy as np

from vae_lab.options import DISENTANGLEMENT_METRICS  # the report's keys, in its order (metrics.json, summary)

MAX_LEVELS = 40  # a factor with at most this many distinct values is taken as discrete as it is
CATEGORICAL_LEVELS = 10  # a factor of whole numbers with at most this many values is a category (shape, colour)
INACTIVE_STD = 0.05  # FactorVAE score: dimensions whose codes vary less than this are left out (collapsed)


def factor_levels(factors: np.ndarray, bins: int) -> np.ndarray:
    """(N, K) int: each factor's value as a level index (its own values if few, else equal-count bins).

    Few means at most MAX_LEVELS values, each held by two codes on average: a factor whose values
    are nearly all distinct among the codes (a continuous one, few codes) is binned, so that
    codes share levels (the FactorVAE score fixes a level and needs two codes at it)."""
    levels = np.empty(factors.shape, dtype=np.int64)
    for k in range(factors.shape[1]):
        values, index = np.unique(factors[:, k], return_inverse=True)
        if len(values) <= min(MAX_LEVELS, len(factors) // 2):
            levels[:, k] = index
        else:
            edges = np.quantile(factors[:, k], np.linspace(0, 1, bins + 1)[1:-1])
            levels[:, k] = np.searchsorted(edges, factors[:, k], side="right")
    return levels


def categorical(factors: np.ndarray) -> np.ndarray:
    """(K,) bool: factors of whole numbers with few values (an index such as the shape), not quantities."""
    return np.array([
        np.all(factors[:, k] == np.round(factors[:, k])) and len(np.unique(factors[:, k])) <= CATEGORICAL_LEVELS
        for k in range(factors.shape[1])
    ])


def discretize_codes(codes: np.ndarray, bins: int) -> np.ndarray:
    """(N, D) int: each dimension cut into `bins` equal-width bins over its range."""
    out = np.empty(codes.shape, dtype=np.int64)
    for d in range(codes.shape[1]):
        edges = np.histogram_bin_edges(codes[:, d], bins=bins)[1:-1]
        out[:, d] = np.digitize(codes[:, d], edges)
    return out


def mutual_information_matrix(codes: np.ndarray, levels: np.ndarray, bins: int) -> np.ndarray:
    """(D, K) I(z_d; v_k) in nats, from the binned codes."""
    from sklearn.metrics import mutual_info_score

    binned = discretize_codes(codes, bins)
    return np.array([[mutual_info_score(levels[:, k], binned[:, d]) for k in range(levels.shape[1])]
                     for d in range(codes.shape[1])])


def entropies(levels: np.ndarray) -> np.ndarray:
    """(K,) H(v_k) in nats."""
    from sklearn.metrics import mutual_info_score

    return np.array([mutual_info_score(levels[:, k], levels[:, k]) for k in range(levels.shape[1])])


def mig(codes: np.ndarray, levels: np.ndarray, bins: int = 20) -> float:
    """Mutual information gap: mean over factors of (top-1 - top-2 of I(z_d; v_k)) / H(v_k)."""
    if codes.shape[1] < 2:
        raise ValueError("MIG needs at least 2 latent dimensions")
    information = np.sort(mutual_information_matrix(codes, levels, bins), axis=0)[::-1]
    entropy = entropies(levels)
    keep = entropy > 0  # a constant factor has no information to capture
    return float(np.mean((information[0, keep] - information[1, keep]) / entropy[keep]))


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed 80/20 split of n items into training and held-out indices."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(0.8 * n)
    return order[:cut], order[cut:]


def dci(codes: np.ndarray, levels: np.ndarray, *, trees: int = 30, depth: int = 8, seed: int = 0,
        threads: int = 1) -> dict[str, float]:
    """DCI disentanglement, completeness and informativeness from random-forest importances."""
    from sklearn.ensemble import RandomForestClassifier

    train, test = _split(len(codes), seed)
    dims, count = codes.shape[1], levels.shape[1]
    importance = np.zeros((dims, count))
    accuracy = np.zeros(count)
    for k in range(count):
        # Every dimension is a candidate at every split (max_features=None): with sqrt(D) candidates a
        # useless dimension wins splits whenever the useful one is left out, and takes importance it does not have.
        forest = RandomForestClassifier(n_estimators=trees, max_depth=depth, max_features=None, random_state=seed, n_jobs=threads)
        forest.fit(codes[train], levels[train, k])
        importance[:, k] = forest.feature_importances_
        accuracy[k] = forest.score(codes[test], levels[test, k])
    return {
        "dci_disentanglement": disentanglement_from_importance(importance),
        "dci_completeness": completeness_from_importance(importance),
        "dci_informativeness": float(accuracy.mean()),
    }


def _one_minus_entropy(p: np.ndarray, axis: int) -> np.ndarray:
    """1 - H(p) / log(size) along `axis` of a matrix of non-negative weights (normalised there)."""
    size = p.shape[axis]
    p = p / np.clip(p.sum(axis=axis, keepdims=True), 1e-12, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=axis)
    return 1.0 - h / np.log(size) if size > 1 else np.ones(h.shape)


def disentanglement_from_importance(importance: np.ndarray) -> float:
    """Each dimension's 1 - H_K(its row), weighted by its share of the total importance."""
    total = importance.sum()
    if total <= 0:
        return 0.0
    return float(np.sum(_one_minus_entropy(importance, axis=1) * importance.sum(axis=1) / total))


def completeness_from_importance(importance: np.ndarray) -> float:
    """Each factor's 1 - H_D(its column), averaged over factors."""
    return float(np.mean(_one_minus_entropy(importance, axis=0)))


def sap(codes: np.ndarray, factors: np.ndarray, levels: np.ndarray, *, seed: int = 0) -> float:
    """Separated attribute predictability: mean over factors of the gap between its two most predictive dimensions."""
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.tree import DecisionTreeClassifier

    if codes.shape[1] < 2:
        raise ValueError("SAP needs at least 2 latent dimensions")
    train, test = _split(len(codes), seed)
    kinds = categorical(factors)
    score = np.zeros((codes.shape[1], factors.shape[1]))
    for k in range(factors.shape[1]):
        for d in range(codes.shape[1]):
            if kinds[k]:
                classes = len(np.unique(levels[:, k]))
                tree = DecisionTreeClassifier(max_depth=int(np.ceil(np.log2(max(classes, 2)))) + 1, random_state=seed)
                tree.fit(codes[train, d:d + 1], levels[train, k])
                predicted = tree.predict(codes[test, d:d + 1])
                score[d, k] = max(0.0, balanced_accuracy_score(levels[test, k], predicted, adjusted=True))
            else:
                c, v = codes[:, d], factors[:, k]
                score[d, k] = 0.0 if c.std() == 0 or v.std() == 0 else np.corrcoef(c, v)[0, 1] ** 2
    top = np.sort(score, axis=0)[::-1]
    return float(np.mean(top[0] - top[1]))


def factor_vae_score(codes: np.ndarray, levels: np.ndarray, *, votes: int = 2000, group_size: int = 64,
                     seed: int = 0) -> float:
    """Accuracy of the majority-vote classifier from least-variance dimensions to the fixed factor."""
    rng = np.random.default_rng(seed)
    scale = codes.std(axis=0)
    active = scale > INACTIVE_STD
    if not active.any():
        return 0.0
    scaled = codes[:, active] / scale[active]
    dims, count = scaled.shape[1], levels.shape[1]
    groups = [[np.flatnonzero(levels[:, k] == value) for value in np.unique(levels[:, k])] for k in range(count)]
    groups = [[g for g in factor if len(g) >= 2] for factor in groups]
    usable = [k for k in range(count) if groups[k]]
    if not usable:  # no two codes share a level of any factor: no vote can be taken
        return float("nan")

    def vote() -> tuple[int, int]:
        k = usable[rng.integers(len(usable))]
        members = groups[k][rng.integers(len(groups[k]))]
        chosen = rng.choice(members, size=min(group_size, len(members)), replace=False)
        return int(np.argmin(scaled[chosen].var(axis=0))), k

    table = np.zeros((dims, count), dtype=np.int64)
    for _ in range(votes):
        d, k = vote()
        table[d, k] += 1
    classifier = table.argmax(axis=1)  # each dimension's majority factor
    held_out = [vote() for _ in range(votes)]
    return float(np.mean([classifier[d] == k for d, k in held_out]))


def disentanglement_report(codes: np.ndarray, factors: np.ndarray, factor_names, *, bins: int = 20, seed: int = 0,
                           threads: int = 1, votes: int = 2000) -> dict:
    """The metrics DISENTANGLEMENT_METRICS names, the MI matrix for the figure, and each estimator's settings and cost."""
    with warnings.catch_warnings():
        # scikit-learn's notes on small held-out sets (classes missing from a split, many classes for few
        # codes): the metrics are defined all the same, and the evaluation says when the codes are few.
        warnings.simplefilter("ignore", UserWarning)
        return _report(np.asarray(codes, dtype=np.float64), np.asarray(factors, dtype=np.float64), tuple(factor_names),
                       bins=bins, seed=seed, threads=threads, votes=votes)


def _report(codes, factors, factor_names, *, bins, seed, threads, votes) -> dict:
    started = time.perf_counter()
    levels = factor_levels(factors, bins)
    information = mutual_information_matrix(codes, levels, bins)
    entropy = entropies(levels)
    seconds = {}

    def timed(name, compute):
        begun = time.perf_counter()
        value = compute()
        seconds[name] = round(time.perf_counter() - begun, 3)
        return value

    report = {"mig": timed("mig", lambda: mig(codes, levels, bins))}
    report.update(timed("dci", lambda: dci(codes, levels, seed=seed, threads=threads)))
    report["sap"] = timed("sap", lambda: sap(codes, factors, levels, seed=seed))
    report["factor_vae_score"] = timed("factor_vae_score", lambda: factor_vae_score(codes, levels, votes=votes, seed=seed))
    report["disentanglement_settings"] = {
        "codes": len(codes), "factors": list(factor_names), "factor_levels": [int(levels[:, k].max()) + 1 for k in range(levels.shape[1])],
        "categorical_factors": [name for name, kind in zip(factor_names, categorical(factors)) if kind],
        "bins": bins, "held_out": "20% of the codes (DCI, SAP)",
        "dci_regressor": "RandomForestClassifier(n_estimators=30, max_depth=8, max_features=None) per factor",
        "sap_predictor": "DecisionTreeClassifier on one dimension (categorical factors, chance-adjusted balanced accuracy); "
                         "R^2 of a line (numeric factors)",
        "factor_vae_votes": votes, "factor_vae_group_size": 64, "seconds": {**seconds, "total": round(time.perf_counter() - started, 3)},
    }
    report["factor_mutual_information"] = {
        name: [round(float(v), 6) for v in information[:, k] / max(entropy[k], 1e-12)] for k, name in enumerate(factor_names)
    }
    return report
