"""The evaluate task: a checkpoint in, the reference figures and a likelihood report out.

Model, loss and data are rebuilt from the checkpoint alone; from the current config
come only the machine's settings (device, data location) and the evaluate: node.
Results are written to a hidden sibling folder and renamed to results/ at the end,
so results/ is either complete or absent, and an existing one is never written over.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from vae_lab import plots
from vae_lab.checkpoint import (
    MACHINE_DATA_KEYS, check_data_fits, data_config_here, load_checkpoint, load_model_weights, load_objective_state, plain_data_value,
    resolve_checkpoint_path, saved_config,
)
from vae_lab.data import as_float
from vae_lab.engine import run_epoch
from vae_lab.errors import ConfigError, VaeLabError
from vae_lab.files import write_atomic
from vae_lab.layout import REPORT_FILE, RunLayout
from vae_lab.likelihoods import bits_per_dim
from vae_lab.metrics import active_units, encode_all, importance_weighted_nll, kl_per_layer, mean_kl_per_dimension, reconstruction_mse
from vae_lab.outcome import TaskOutcome, evaluation_outcome
from vae_lab.runtime import build, build_vae, resolve_device
from vae_lab.sample_report import log_sample_quality, sample_quality
from vae_lab.validate import attempt

log = logging.getLogger(__name__)

TRAVERSAL_STEPS = 20  # images per row of latent_traversal.png
FEW_CODES = 1000  # disentanglement metrics from fewer test codes come with a warning
# Below this many epochs few units are active yet (the reference ConvVAE on 1,000 images of the bundled
# sample: 4 of 16 after 1 epoch, 16 of 16 after 6): no collapse warning, a note instead.
EPOCHS_TO_JUDGE_COLLAPSE = 5
PRIOR_QUANTILE_DRAWS = 20_000  # prior samples behind the traversal's quantiles
INTERPOLATION_PAIRS = 8


def evaluate(cfg: DictConfig, run_dir: Path) -> TaskOutcome:
    """The task: evaluate cfg.evaluate.checkpoint into run_dir/results; its value is the test -ELBO."""
    if not cfg.evaluate.checkpoint:
        raise ConfigError(
            "evaluate.checkpoint is not set: pass evaluate.checkpoint=PATH, a checkpoint file "
            "or a training run's directory (e.g. outputs/<date>/<time>)."
        )
    return evaluation_outcome(run_dir, evaluate_checkpoint(cfg, cfg.evaluate.checkpoint, RunLayout(run_dir).results))


def evaluate_checkpoint(cfg: DictConfig, checkpoint: str | Path, results_dir: Path) -> dict:
    """Compute the likelihood report and draw the figures of one checkpoint into results_dir.

    The file goes through the whole untrusted-file pipeline (load_checkpoint, saved_config)
    before anything is built from it.
    """
    started = time.perf_counter()
    _refuse_existing(results_dir)
    path = resolve_checkpoint_path(checkpoint)
    state = load_checkpoint(path)
    saved = saved_config(state, path, tuple(cfg.trusted_modules))
    device = resolve_device(cfg.device)
    data_node = OmegaConf.create({"data": _data_to_evaluate_on(cfg, state, saved)})
    data = attempt(data_node, "data", lambda: build(data_node.data)).to(device)
    check_data_fits(state, data, path)
    _say_if_other_data(data, data_node.data, data_config_here(state, saved, cfg.data), state)
    model, objective = build_vae(saved.model, saved.prior, saved.loss, data.image_shape, saved.posterior)
    load_model_weights(model, state, path)
    load_objective_state(objective, state, path)
    model.to(device)
    objective.to(device)
    return evaluate_model(cfg, model, objective, data, epoch=state["epoch"], checkpoint=path, results_dir=results_dir,
                          started=started)


def _data_to_evaluate_on(cfg: DictConfig, state: dict, saved: DictConfig) -> DictConfig:
    """The data config to evaluate on: the checkpoint's own (data_config_here: at this machine's
    location), with the data.* settings this command line gives; or, when it chooses a data set
    with data=..., that data set as composed. check_data_fits then holds either to the
    checkpoint's image shape and pixel kind (a model evaluated on other data of its kind is a
    real experiment; data of another kind is refused)."""
    given = _data_overrides_on_command_line()
    if "" in given:  # resolved here: its interpolations (${evaluate.cache_dir}) refer to the rest of cfg
        return OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
    node = data_config_here(state, saved, cfg.data)
    with open_dict(node):
        for key in given - set(MACHINE_DATA_KEYS):  # data_config_here placed those
            if key not in cfg.data:  # ~data.<key>
                raise ConfigError(f"~data.{key}: evaluate takes the data settings of the checkpoint and of this command line; "
                                  f"set data.{key}=... instead of removing it")
            if key not in node:
                raise ConfigError(f"data.{key}: the data the checkpoint was trained on ({node.get('_target_')}) has no setting "
                                  f"{key}; to evaluate on other data, choose it with data=... (and its settings)")
            node[key] = plain_data_value(key, cfg.data[key])
    return node


def _say_if_other_data(data, used: DictConfig, trained: DictConfig, state: dict) -> None:
    """One warning when the data evaluated on is not the data the checkpoint was trained on."""
    trained_on = state.get("data", trained.get("name"))
    other = [f"{trained_on} -> {data.name}"] if data.name != trained_on else []
    show = lambda value: "null" if value is None else value  # noqa: E731  (as the command line writes it)
    other += [f"data.{key}={show(used.get(key))} (trained: {show(trained.get(key))})" for key in sorted(set(used) | set(trained))
              if key not in (*MACHINE_DATA_KEYS, "name") and used.get(key) != trained.get(key)]
    if other:
        log.warning("evaluating on other data than the checkpoint was trained on, as this command line asks: %s", "; ".join(other))


def _command_line_keys() -> set[str]:
    """The keys this command line sets (cli.override_key of each override); none when no command line
    composed the config (a task called directly)."""
    from hydra.core.hydra_config import HydraConfig

    from vae_lab.cli import override_key

    return {override_key(a) for a in HydraConfig.get().overrides.task} if HydraConfig.initialized() else set()


def _data_overrides_on_command_line() -> set[str]:
    """The data settings this command line gives: "" for the group itself (data=...), else each
    data.<key>'s top-level key."""
    return {"" if key == "data" else key.split(".")[1] for key in _command_line_keys() if key == "data" or key.startswith("data.")}


def evaluate_model(cfg: DictConfig, model, objective, data, *, epoch: int, checkpoint: Path, results_dir: Path,
                   started: float | None = None) -> dict:
    """The likelihood report and figures of a model in memory (the train task's, at its end;
    `checkpoint` is the file that holds these same weights, named in the report)."""
    started = time.perf_counter() if started is None else started
    _refuse_existing(results_dir)
    path = Path(checkpoint)
    model.eval()
    ev = cfg.evaluate
    log.info("evaluating %s (epoch %d) on %d %s test images (%s)", path, epoch, len(data.test_images), data.name, data.variant)

    images = data.test_images
    one_sample = run_epoch(model, objective, images, ev.batch_size, description="ELBO")
    mu, logvar = encode_all(model, images, ev.batch_size)
    kl_dims = mean_kl_per_dimension(model.prior, mu, logvar)
    kl_dims = None if kl_dims is None else kl_dims.cpu().numpy()
    active = active_units(mu).cpu().numpy()
    iw_started = time.perf_counter()
    iw_images = images[: ev.iw_limit] if ev.iw_limit else images
    iw_nll = importance_weighted_nll(model, iw_images, ev.iw_samples, batch_size=ev.batch_size, seed=cfg.seed)
    iw_seconds = time.perf_counter() - iw_started
    disentangled = disentanglement_metrics(cfg, data, mu)
    layers = _layer_report(model, images, mu, ev.batch_size, cfg.seed)
    report = {
        "checkpoint": str(path.resolve()),
        "epoch": epoch,
        "data": data.name,
        "data_variant": data.variant,
        "binarize": data.binarize,
        "test_images": len(images),
        "model": type(model).__name__,
        "prior": type(model.prior).__name__,
        "posterior": type(model.posterior_flow).__name__,
        "objective_name": repr(objective),
        "reconstruction_loss": objective.reconstruction,
        "true_log_likelihood": model.likelihood.is_true_log_likelihood(data.binary, data.values),
        "data_values": data.values,
        "image_shape": list(data.image_shape),
        "kl_estimator": model.kl_estimator,
        "alpha": getattr(objective, "alpha", 1.0),
        "objective": one_sample["loss"],
        "neg_elbo": one_sample["recon"] + one_sample["kl"],
        "recon": one_sample["recon"],
        "kl": one_sample["kl"],
        "iw_samples": ev.iw_samples,
        "iw_nll": iw_nll,
        "iw_images": len(iw_images),
        "latent_dim": model.latent_dim,
        "active_units": int(active.sum()),
        "kl_per_dimension": None if kl_dims is None else [round(float(v), 6) for v in kl_dims],
        "mse_per_pixel": reconstruction_mse(model, images, ev.batch_size),
        "iw_seconds": round(iw_seconds, 3),
    }
    report.update(layers)
    report.update(disentangled)
    if model.likelihood.discrete:  # nats of a distribution over the 256 levels: bits per dimension, as papers report
        report["bits_per_dim"] = bits_per_dim(report["neg_elbo"], data.image_shape)
        report["iw_bits_per_dim"] = bits_per_dim(iw_nll, data.image_shape)
    if isinstance(getattr(model.likelihood, "log_scale", None), torch.Tensor):
        report["likelihood_scale"] = model.likelihood.log_scale.exp().item()
    try:
        with _staging(results_dir) as folder, model.prior_frozen():
            figures = cfg.get("figures", True)
            if figures:
                _figures(model, data, mu, kl_dims, active, ev, folder, cfg.seed)
                _disentanglement_figures(model, mu, kl_dims, disentangled, folder, cfg.seed)
            report.update(sample_quality(
                model, data, mu, folder, samplers=list(ev.samplers), gmm_components=ev.gmm_components,
                sample_count=ev.sample_count, sample_metrics=ev.sample_metrics, batch_size=ev.batch_size,
                cache_dir=ev.cache_dir, seed=cfg.seed, generation_samples=ev.generation_samples, images_per_row=ev.images_per_row,
                figures=figures,
            ))
            report["seconds"] = round(time.perf_counter() - started, 3)
            write_atomic(folder / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    except OSError as error:
        raise VaeLabError(
            f"cannot write the results to {results_dir}: {error.strerror or error}. "
            "Nothing was left half-written; free space or evaluate into another run directory."
        ) from error
    _log_report(report)
    log_sample_quality(report)
    return report


# evaluate=auto (the default): a training shorter than this is evaluated at its end with evaluate=light's settings.
SHORT_RUN_EPOCHS = 10


def end_of_run_settings(cfg: DictConfig) -> DictConfig:
    """cfg as the end-of-run evaluation uses it: with evaluate.preset=auto and train.epochs < SHORT_RUN_EPOCHS,
    evaluate=light's settings (conf/evaluate/light.yaml, the one definition) replace the full ones, except those
    the command line sets itself; said in one line. Otherwise cfg as it is."""
    if cfg.evaluate.get("preset") != "auto" or cfg.train.epochs >= SHORT_RUN_EPOCHS:
        return cfg
    from vae_lab.cli import CONFIG_DIR

    light = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "evaluate" / "light.yaml"))
    given = _command_line_keys()
    changed = {key: value for key, value in light.items() if key not in ("defaults", "preset") and f"evaluate.{key}" not in given
               and OmegaConf.select(cfg, f"evaluate.{key}") != value}
    cfg = cfg.copy()
    for key, value in changed.items():
        OmegaConf.update(cfg, f"evaluate.{key}", value, merge=False)
    log.info("train.epochs=%d is a short run (under %d epochs): its end-of-run evaluation takes evaluate=light's settings "
             "(%s); evaluate=full gives the whole one", cfg.train.epochs, SHORT_RUN_EPOCHS,
             ", ".join(f"{key}={value}" for key, value in changed.items()) or "as set")
    return cfg


def check_evaluation_fits(cfg: DictConfig, data) -> None:
    """Settings that only the loaded data can answer, checked before any training: disentanglement
    metrics asked for (evaluate.disentanglement=true) on data that carries no generating factors."""
    if cfg.evaluate.get("disentanglement", "auto") is True and data.test_factors is None:
        raise ConfigError(
            f"evaluate.disentanglement=true, but {data.name} carries no generating factors to judge codes by: "
            "use data=shapes (or a loader of your own that returns train_factors / test_factors), "
            "or evaluate.disentanglement=auto to leave the metrics out."
        )


def _layer_report(model, images: torch.Tensor, means: torch.Tensor, batch_size: int, seed: int) -> dict:
    """A hierarchical model's KL and active units per stochastic layer (bottom to top); {} for one layer."""
    sizes = list(model.layer_sizes)
    if len(sizes) < 2:
        return {}
    active = [int(active_units(part).sum()) for part in means.split(sizes, dim=1)]
    return {"layer_sizes": sizes, "kl_per_layer": [round(v, 4) for v in kl_per_layer(model, images, batch_size, seed)],
            "active_units_per_layer": active}


def disentanglement_metrics(cfg: DictConfig, data, mu: torch.Tensor) -> dict:
    """The metrics of vae_lab.disentanglement on the test codes, where the data has factors (else {} and a note)."""
    setting = cfg.evaluate.get("disentanglement", "auto")
    if setting is False:
        return {}
    check_evaluation_fits(cfg, data)
    if data.test_factors is None:
        log.info("disentanglement metrics left out: %s carries no generating factors (data=shapes does)", data.name)
        return {}
    from vae_lab.disentanglement import disentanglement_report

    count = min(len(mu), cfg.evaluate.get("disentanglement_codes", 10_000))
    if mu.shape[1] < 2:
        log.info("disentanglement metrics left out: they compare latent dimensions, and there is %d", mu.shape[1])
        return {}
    if count < FEW_CODES:
        log.warning("disentanglement metrics from %d test codes only: noisy estimates (a test split of %d or more "
                    "makes them steadier)", count, FEW_CODES)
    threads = max(1, torch.get_num_threads())
    return disentanglement_report(mu[:count].double().cpu().numpy(), data.test_factors[:count].double().cpu().numpy(),
                                  data.factor_names, seed=cfg.seed, threads=threads)


def _refuse_existing(results_dir: Path) -> None:
    if results_dir.exists() and any(results_dir.iterdir()):
        raise VaeLabError(f"{results_dir} already holds results; refusing to write over them. Evaluate into a new run directory.")


class _staging:
    """A hidden folder beside `target`, renamed to it on success and removed on failure."""

    def __init__(self, target: Path):
        self.target = target

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        # A unique name made with mkdir (not mkdtemp, whose 0700 mode results/ would keep).
        self.folder = self.target.parent / f".{self.target.name}-{uuid.uuid4().hex[:12]}"
        self.folder.mkdir()
        return self.folder

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            if self.target.exists():
                self.target.rmdir()  # empty, or _refuse_existing would have stopped us
            self.folder.rename(self.target)
        else:
            shutil.rmtree(self.folder, ignore_errors=True)


@torch.no_grad()
def _figures(model, data, mu: torch.Tensor, kl_dims: np.ndarray, active: np.ndarray, ev: DictConfig, folder: Path, seed: int) -> None:
    images, labels = data.test_images, data.test_labels
    per_row = min(ev.images_per_row, len(images))  # a small test split: fewer, shorter rows
    count = min(ev.reconstruction_rows, len(images) // per_row) * per_row
    plots.reconstruction_grid(
        as_float(images[:count]), model.mean(model.decode(mu[:count])), folder / "reconstruction.png", per_row=per_row,
        title="Reconstruction: odd rows test images, even rows their reconstructions",
    )
    generator = torch.Generator().manual_seed(seed)
    plots.image_grid(
        model.sample(ev.generation_samples, generator=generator), folder / "random_generation.png",
        nrow=per_row, title=f"Random generation: decoded z ~ p(z) ({type(model.prior).__name__}), latent_dim={model.latent_dim}",
    )
    _embedding(mu, labels, data.class_names, ev, folder / "latent_embedding.png", seed)
    _traversal(model, mu, labels, folder / "latent_traversal.png", seed)
    if kl_dims is None:
        log.info("kl_per_dimension.png not drawn: the KL to a %s does not split by latent dimension", type(model.prior).__name__)
        return
    plots.kl_per_dimension(
        kl_dims, active, folder / "kl_per_dimension.png",
        title=f"KL per latent dimension: {int(active.sum())} of {len(kl_dims)} active (Cov_x E[z|x] > 0.01)",
    )


def _embedding(mu: torch.Tensor, labels: torch.Tensor, class_names, ev: DictConfig, path: Path, seed: int) -> None:
    points = mu[: ev.embedding_points].cpu().numpy()
    labels = labels[: ev.embedding_points].cpu().numpy()
    dims = points.shape[1]
    if dims > ev.n_components and len(points) <= ev.n_components:
        log.warning("%s not drawn: reducing the %d-D latent means to %d dimensions needs more than %d test images, "
                    "and there are %d (raise evaluate.embedding_points or data.limit)",
                    path.name, dims, ev.n_components, ev.n_components, len(points))
        return
    if dims <= ev.n_components:
        how, axis = f"the {dims}-D latent means", "z"
    elif ev.embedding == "pca":
        from sklearn.decomposition import PCA

        points = PCA(n_components=ev.n_components, random_state=seed).fit_transform(points)
        how, axis = f"PCA of the {dims}-D latent means", "PC"
    else:
        from sklearn.manifold import TSNE

        # t-SNE needs fewer neighbours (perplexity, 30 by default) than points: lower it on small sets.
        perplexity = min(30.0, len(points) - 1.0)
        log.info("t-SNE of %d latent means (one scikit-learn call: no progress until it ends)", len(points))
        points = TSNE(n_components=ev.n_components, perplexity=perplexity, random_state=seed, init="pca").fit_transform(points)
        how, axis = f"t-SNE of the {dims}-D latent means" + (f" (perplexity {perplexity:g})" if perplexity < 30 else ""), "t-SNE"
    if points.shape[1] == 1:  # a 1-D latent: spread the classes along the second axis
        points = np.column_stack([points[:, 0], labels + np.random.default_rng(seed).uniform(-0.3, 0.3, len(labels))])
    plots.latent_embedding(points, labels, path, title=f"Latent embedding: {how}, {len(points)} test images",
                           axis_label=axis, class_names=class_names)


def _traversal(model, mu: torch.Tensor, labels: torch.Tensor, path: Path, seed: int) -> None:
    """2-D (or 1-D) latent: the decoded manifold over the prior's quantiles; larger: interpolations."""
    quantiles = torch.linspace(0.05, 0.95, TRAVERSAL_STEPS)
    device = mu.device
    if model.latent_dim <= 2:
        # Each axis over the 5%..95% quantiles of the prior's marginal, estimated from samples (any prior).
        draws = model.sample_prior(PRIOR_QUANTILE_DRAWS, torch.Generator().manual_seed(seed)).float().cpu()
        values = torch.quantile(draws, quantiles, dim=0)  # (steps, D)
        if model.latent_dim == 1:
            z = values
        else:  # rows: z2 from high to low (as a y axis reads), columns: z1 from low to high
            z2, z1 = torch.meshgrid(values[:, 1].flip(0), values[:, 0], indexing="ij")
            z = torch.stack([z1.flatten(), z2.flatten()], dim=1)
        title = f"Latent traversal: the decoder over the prior's 5%..95% quantiles ({model.latent_dim}-D latent)"
        plots.image_grid(model.mean(model.decode(z.to(device))), path, nrow=TRAVERSAL_STEPS, title=title)
        return
    starts, ends = _interpolation_pairs(labels.cpu(), INTERPOLATION_PAIRS)
    if not starts:
        log.warning("%s not drawn: interpolating needs at least 2 test images, and there is %d", path.name, len(labels))
        return
    weights = torch.linspace(0, 1, TRAVERSAL_STEPS, device=device).view(1, -1, 1)  # (1, steps, 1)
    z = mu[starts].unsqueeze(1) * (1 - weights) + mu[ends].unsqueeze(1) * weights  # (pairs, steps, D)
    plots.image_grid(model.mean(model.decode(z.flatten(0, 1))), path, nrow=TRAVERSAL_STEPS,
                     title="Latent traversal: interpolations between the latent means of pairs of test images")


TRAVERSAL_DIMENSION_STEPS = 11  # images per row of dimension_traversal.png
TRAVERSAL_MAX_ROWS = 32


@torch.no_grad()
def _disentanglement_figures(model, mu: torch.Tensor, kl_dims, disentangled: dict, folder: Path, seed: int) -> None:
    """dimension_traversal.png: one row per latent dimension (largest KL first), that dimension swept over
    the prior's 5%..95% quantiles from the first test image's code; factor_information.png where factors are known."""
    if model.latent_dim < 2:
        return
    spread = torch.as_tensor(kl_dims) if kl_dims is not None else mu.float().var(0).cpu()
    order = torch.argsort(spread, descending=True).tolist()
    rows = order[:TRAVERSAL_MAX_ROWS]
    draws = model.sample_prior(PRIOR_QUANTILE_DRAWS, torch.Generator().manual_seed(seed)).float().cpu()
    values = torch.quantile(draws, torch.linspace(0.05, 0.95, TRAVERSAL_DIMENSION_STEPS), dim=0).to(mu.device)  # (steps, D)
    z = mu[:1].repeat(len(rows) * TRAVERSAL_DIMENSION_STEPS, 1).view(len(rows), TRAVERSAL_DIMENSION_STEPS, -1).clone()
    for row, d in enumerate(rows):
        z[row, :, d] = values[:, d]
    plots.image_grid(model.mean(model.decode(z.flatten(0, 1).to(mu.dtype))), folder / "dimension_traversal.png",
                     nrow=TRAVERSAL_DIMENSION_STEPS, row_labels=[f"z{d}" for d in rows],
                     title="Latent traversal per dimension, largest KL first:\none dimension over the prior's 5%..95% "
                           "quantiles, the others at a test image's code"
                           + (f"; first {TRAVERSAL_MAX_ROWS} of {len(order)}" if len(order) > len(rows) else ""))
    if "factor_mutual_information" in disentangled:
        plots.factor_information(
            disentangled["factor_mutual_information"], order, folder / "factor_information.png",
            title=f"Mutual information of factors and latent dimensions: MIG {disentangled['mig']:.3f}, "
                  f"DCI disentanglement {disentangled['dci_disentanglement']:.3f}",
        )


def _interpolation_pairs(labels: torch.Tensor, count: int) -> tuple[list[int], list[int]]:
    """Pairs of test images of different classes, taken in order: (i, next j with another label)."""
    starts, ends, i = [], [], 0
    while len(starts) < count and i < len(labels) - 1:
        j = next((j for j in range(i + 1, len(labels)) if labels[j] != labels[i]), i + 1)
        starts.append(i)
        ends.append(min(j, len(labels) - 1))
        i = j + 1
    return starts, ends


def _likelihood_statement(report: dict) -> str:
    name = report["reconstruction_loss"]
    if report["true_log_likelihood"]:
        return f"yes ({name} on {report['data_variant']})"
    if name == "bce":
        return "no: Bernoulli nats on intensities; use data.binarize=dynamic or loss.reconstruction=continuous_bernoulli"
    if name == "discretized_logistic":
        return f"no: a distribution over 256 levels, and these pixels are {report.get('data_variant', 'not 8-bit')}"
    return f"no: {name} is not a normalised density (nats off by a constant)"


def _log_report(report: dict) -> None:
    rows = [
        ("-ELBO (alpha = 1)", f"{report['neg_elbo']:.3f} nats  (recon {report['recon']:.3f} + KL {report['kl']:.3f})"),
        (f"objective {report['objective_name']}", f"{report['objective']:.3f} nats"),
        (f"-log p(x), IW bound, k = {report['iw_samples']}", f"{report['iw_nll']:.3f} nats"
         + (f"  (first {report['iw_images']} test images)" if report["iw_images"] < report["test_images"] else "")),
        *([("bits per dimension", f"{report['bits_per_dim']:.4f} (-ELBO), {report['iw_bits_per_dim']:.4f} (IW bound)")]
          if "bits_per_dim" in report else []),
        ("KL estimate", report["kl_estimator"]),
        ("a true log-likelihood?", _likelihood_statement(report)),
        ("active units", f"{report['active_units']} / {report['latent_dim']}"),
        *([("per layer, bottom to top: KL", " / ".join(f"{v:.2f}" for v in report["kl_per_layer"])),
           ("per layer: active units", " / ".join(f"{a} of {d}" for a, d in zip(report["active_units_per_layer"], report["layer_sizes"])))]
          if "kl_per_layer" in report else []),
        ("reconstruction MSE per pixel", f"{report['mse_per_pixel']:.5f}"),
        *([("MIG / SAP / FactorVAE score", f"{report['mig']:.3f} / {report['sap']:.3f} / {report['factor_vae_score']:.3f}"),
           ("DCI disent. / compl. / inform.", f"{report['dci_disentanglement']:.3f} / {report['dci_completeness']:.3f} / "
                                              f"{report['dci_informativeness']:.3f}  ({report['disentanglement_settings']['codes']} "
                                              f"codes, {report['disentanglement_settings']['seconds']['total']:.1f}s)")]
          if "mig" in report else []),
    ]
    header = (
        f"likelihood report: {report['data']}, {report['data_variant']}, "
        f"{report['test_images']} test images, checkpoint epoch {report['epoch']}"
    )
    log.info("\n".join([header, *(f"  {label:<32} {value}" for label, value in rows)]))
    if report["active_units"] < report["latent_dim"] / 2 and report["epoch"] < EPOCHS_TO_JUDGE_COLLAPSE:
        log.info("%d of %d latent dimensions are active after %d epoch(s): too few epochs to judge posterior collapse "
                 "(units become active as training goes on).", report["active_units"], report["latent_dim"], report["epoch"])
    elif report["active_units"] < report["latent_dim"] / 2:
        log.warning(
            "posterior collapse: only %d of %d latent dimensions are active after %d epochs; the rest carry no information "
            "(lower train.alpha or model.latent_dim).", report["active_units"], report["latent_dim"], report["epoch"],
        )
