"""Bad input, interrupted runs and untrusted files, through the real CLI where a user meets them."""
from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, compose_config, shared_run
from forked import run_py
from test_data import DAMAGE, write_idx_files
from vae_lab.checkpoint import load_checkpoint, save_checkpoint
from vae_lab.cli import run_task
from vae_lab.errors import CheckpointError, ConfigError, VaeLabError
from vae_lab.rundir import LOCK_FILE

RUN_FILES = "checkpoints, metrics.csv, progress, results"  # what the RUN fixture holds beyond its log
HYDRA_RECORD = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "run.log", LOCK_FILE}
TRAINING_STARTED = {"diverging training (NaN)": {"metrics.csv"}}  # may write what the run had begun
CUDA_MESSAGE = "device=cuda:7 but this machine has"

# (id, overrides, exit status, message). Upper-case words are files made by the `files` fixture;
# CASE is the case's own fresh folder. Status 0: the run must finish; the message (if any) is its note.
CATALOGUE = [
    ("batch size 0", ["train.batch_size=0"], 2, "train.batch_size=0 is not allowed: use a whole number >= 1"),
    ("batch size -5", ["train.batch_size=-5"], 2, "train.batch_size=-5 is not allowed: use a whole number >= 1"),
    ("batch size text", ["train.batch_size=abc"], 2, "train.batch_size='abc' is not allowed: use a whole number >= 1"),
    ("epochs 0", ["train.epochs=0"], 2, "train.epochs=0 is not allowed: use a whole number >= 1"),
    ("latent_dim 0", ["model.latent_dim=0"], 2, "model.latent_dim=0 is not allowed: use a whole number >= 1"),
    ("learning rate 0", ["optim.lr=0"], 2, "optim.lr=0 is not allowed: use a number > 0 (e.g. 0.001)"),
    ("learning rate < 0", ["optim.lr=-0.001"], 2, "optim.lr=-0.001 is not allowed: use a number > 0 (e.g. 0.001)"),
    ("alpha < 0", ["train.alpha=-0.1"], 2, "train.alpha=-0.1 is not allowed: use a number >= 0"),
    ("checkpoint_every 0", ["train.checkpoint_every=0"], 2, "train.checkpoint_every=0 is not allowed: use a whole number >= 1"),
    ("plot_every 0", ["train.plot_every=0"], 2, "train.plot_every=0 is not allowed: use a whole number >= 1"),
    ("unknown reconstruction", ["loss.reconstruction=l1"], 2, "loss.reconstruction='l1' is not allowed: use one of bce, mse"),
    ("unknown device", ["device=gpu"], 2, "device='gpu' is not allowed: use auto, cpu, cuda, cuda:N or mps"),
    ("absent CUDA device", ["device=cuda:7"], 2, CUDA_MESSAGE),
    ("n_components 4", ["task=evaluate", "evaluate.checkpoint=RUN", "evaluate.n_components=4"], 2,
     "evaluate.n_components=4 is not allowed: use one of 2, 3"),
    ("embedding umap", ["task=evaluate", "evaluate.checkpoint=RUN", "evaluate.embedding=umap"], 2,
     "evaluate.embedding='umap' is not allowed: use one of pca, tsne"),
    ("iw_samples 0", ["task=evaluate", "evaluate.checkpoint=RUN", "evaluate.iw_samples=0"], 2,
     "evaluate.iw_samples=0 is not allowed: use a whole number from 1 to 100,000"),
    ("iw_samples 10**8", ["task=evaluate", "evaluate.checkpoint=RUN", "evaluate.iw_samples=100000000"], 2,
     "evaluate.iw_samples=100000000 is not allowed: use a whole number from 1 to 100,000"),  # else days of evaluation
    ("data.limit 0", ["data.limit=0"], 2, "data.limit=0 is not allowed: use a whole number >= 1"),
    ("data root is a file", ["data=mnist", "data.root=TEXT"], 2, "data.root=TEXT is a file: point it at the folder that holds MNIST/raw"),
    ("unknown binarize", ["data.binarize=yes"], 2, "data.binarize='yes' is not allowed: use one of none, static, dynamic"),
    ("unknown task", ["task=predict"], 2, "task='predict' is not allowed: use one of train, evaluate, summarize"),
    ("unknown return metric", ["train.return_metric=accuracy"], 2, "train.return_metric='accuracy' is not allowed: use one of test_loss, test_neg_elbo"),
    # Hydra's own composition errors: one line and exit 2 as well (issue 17), the options named (a subset: options get added)
    ("unknown key (Hydra)", ["train.lr=0.1"], 2, "Could not override 'train.lr'. To append to your config use +train.lr=0.1; Key 'lr' is not in struct"),
    ("unknown group option (Hydra)", ["model=transformer"], 2, "Could not find 'model/transformer'; Available options in 'model': conv_vae, "),
    ("a group removed with ~", ["~prior"], 2, "prior is not in the config (removed with ~prior, or set to a plain value), and task=train needs it"),
    ("a group option that is a number (Hydra)", ["model=3"], 2, "model=3: model= takes the name of one of its options: conv_vae, "),
    ("a config file that is not UTF-8", ["--config-dir=LATIN1CONF", "+experiment=latin1"], 2,
     "LATIN1CONF/experiment/latin1.yaml is not UTF-8 text (byte 17"),
    ("the base class as the likelihood", ["loss.reconstruction={_target_:vae_lab.likelihoods.Likelihood}"], 2,
     "loss.reconstruction is built by 'vae_lab.likelihoods.Likelihood': the base class itself, which builds nothing; name a subclass"),
    ("an instantiate keyword its checkpoint would refuse", ["+loss._convert_=all"], 2,
     "the config has _convert_ at loss._convert_, where vae_lab never writes one"),
    ("data root is a file for CIFAR-10", ["data=cifar10", "data.root=TEXT"], 2, "data.root=TEXT is a file: point it at the folder that holds its files"),
    ("damaged MLflow store", ["logger=mlflow", "logger.mlflow.tracking_uri=sqlite:///FAKEDB"], 2,
     "logger.mlflow.tracking_uri=sqlite:///FAKEDB: FAKEDB cannot be read as an SQLite database (file is not a database)"),
    ("override Hydra cannot parse", ["train.epochs=[1"], 2, "cannot parse the override 'train.epochs=[1': no viable alternative"),
    ("YAML syntax error in a user config", ["--config-dir=USERCONF", "+experiment=broken"], 2,
     "USERCONF/experiment/broken.yaml, line 3, column 1: not valid YAML (expected ',' or ']'"),
    ("Optuna storage that is not a database", ["-m", "hydra/sweeper=optuna", "hydra.sweeper.storage=sqlite:///TEXT",
                                               "hydra.sweeper.n_trials=1", "hydra.sweep.dir=CASE"], 2,
     "hydra.sweeper.storage=sqlite:///TEXT: TEXT is not an SQLite database"),
    ("evaluate without checkpoint", ["task=evaluate"], 2, "evaluate.checkpoint is not set: pass evaluate.checkpoint=PATH"),
    ("missing checkpoint", ["task=evaluate", "evaluate.checkpoint=MISSING"], 2, "no checkpoint at MISSING: the file does not exist"),
    ("folder without checkpoints", ["task=evaluate", "evaluate.checkpoint=EMPTY"], 2, "EMPTY is a folder without checkpoints"),
    ("truncated checkpoint", ["task=evaluate", "evaluate.checkpoint=TRUNCATED"], 2,
     "cannot read TRUNCATED: the file is truncated, corrupted or not a PyTorch file"),
    ("text file as checkpoint", ["task=evaluate", "evaluate.checkpoint=TEXT"], 2,
     "cannot read TEXT: the file is truncated, corrupted or not a PyTorch file"),
    ("sweep into a used sweep directory", ["-m", "train.alpha=0.1,1.0", "hydra.sweep.dir=SWEEP"], 2,
     "hydra.sweep.dir=SWEEP already holds files (notes.md); refusing to write over them"),
    ("foreign PyTorch file", ["task=evaluate", "evaluate.checkpoint=FOREIGN"], 2, "FOREIGN is a PyTorch file but not a vae_lab checkpoint"),
    ("other architecture than its config", ["task=evaluate", "evaluate.checkpoint=ALTERED"], 2,
     "the weights in ALTERED do not fit the model its own config describes"),
    ("pickle that runs code", ["task=evaluate", "evaluate.checkpoint=MALICIOUS"], 2,
     "refused to load MALICIOUS: it holds Python objects that could run code when unpickled"),
    ("config that builds os.system", ["task=evaluate", "evaluate.checkpoint=EVILCONFIG"], 2,
     "refused EVILCONFIG: its config builds something vae_lab does not trust: model is built by 'os.system'"),
    ("resume from a missing file", ["train.resume=MISSING"], 2, "no checkpoint at MISSING: the file does not exist"),
    ("no data and no fallback", ["data=mnist", "data.root=EMPTY", "data.download=false", "data.fallback=false"], 2,
     "mnist not found under EMPTY/MNIST/raw"),
    ("run directory already used", ["hydra.run.dir=RUN"], 2, f"hydra.run.dir=RUN already holds files ({RUN_FILES}); refusing to write over them"),
    ("evaluate into a used run directory", ["task=evaluate", "evaluate.checkpoint=RUN", "hydra.run.dir=RUN"], 2,
     f"hydra.run.dir=RUN already holds files ({RUN_FILES}); refusing to write over them"),
    ("run directory under a file", ["hydra.run.dir=TEXT/run"], 2, "hydra.run.dir=TEXT/run: cannot create it (TEXT is a file)"),
    ("summarize a folder without jobs", ["task=summarize", "summarize.sweep_dir=EMPTY"], 2,
     "summarize.sweep_dir=EMPTY holds no Hydra jobs"),
    ("diverging training (NaN)", ["optim.lr=1e6", "train.epochs=2"], 2,
     "training diverged: the loss is nan at step 2 of epoch 1. No checkpoint was written. Lower optim.lr"),
    # --- Hardening II ---------------------------------------------------------------------------
    # 2. the run directory Hydra resolves, not the argument as typed
    ("used run directory named with an interpolation", ["hydra.run.dir=ROOT/${hydra:job.name}/../run"], 2,
     f"hydra.run.dir=RUN already holds files ({RUN_FILES}); refusing to write over them"),
    ("used run directory named in quotes", ['hydra.run.dir="RUN"'], 2, f"hydra.run.dir=RUN already holds files ({RUN_FILES})"),
    ("evaluate into a training run, by interpolation", ["task=evaluate", "evaluate.checkpoint=RUN", "hydra.run.dir=ROOT/${hydra:job.name}/../run"], 2,
     f"hydra.run.dir=RUN already holds files ({RUN_FILES}); refusing to write over them"),
    ("used sweep directory named with an interpolation", ["-m", "train.alpha=0.1,1.0", "hydra.sweep.dir=ROOT/${hydra:job.name}/../sweep"], 2,
     "hydra.sweep.dir=SWEEP already holds files (notes.md); refusing to write over them"),
    ("sweep with a constant subdir", ["-m", "train.alpha=0.1,1.0", "hydra.sweep.dir=CASE", "hydra.sweep.subdir=same"], 2,
     "hydra.sweep.subdir=same gives two jobs of this sweep the same folder (CASE/same), so one would write over the other"),
    ("sweep subdir that leaves out the swept key", ["-m", "train.alpha=0.1,1.0", "hydra.sweep.dir=CASE", "hydra.sweep.subdir=${hydra.job.override_dirname}",
                                                    "hydra.job.config.override_dirname.exclude_keys=[train.alpha]"], 2,
     "gives two jobs of this sweep the same folder (CASE/"),
    ("sweep subdir by overrides with a repeated value", ["-m", "train.alpha=0.5,0.5", "hydra.sweep.dir=CASE",
                                                         "hydra.sweep.subdir=${hydra.job.override_dirname}"], 2,
     "gives two jobs of this sweep the same folder (CASE/"),
    # 7. damaged data is named, never replaced; a resumed run never switches data sets
    ("truncated IDX file", ["data=mnist", "data.root=IDX_TRUNCATED", "data.download=false"], 2,
     "cannot use IDX_TRUNCATED/MNIST/raw/t10k-images-idx3-ubyte: it has 5,000 bytes but its header promises 25,104"),
    ("IDX file with a wrong magic number", ["data=mnist", "data.root=IDX_MAGIC", "data.download=false"], 2,
     "cannot use IDX_MAGIC/MNIST/raw/t10k-images-idx3-ubyte: its magic number is 0x00000809, not 0x00000803"),
    ("IDX image and label counts differ", ["data=mnist", "data.root=IDX_COUNT", "data.download=false"], 2,
     "cannot use IDX_COUNT/MNIST/raw/t10k-labels-idx1-ubyte: it holds 30 labels but t10k-images-idx3-ubyte holds 32 images"),
    ("IDX label out of range", ["data=mnist", "data.root=IDX_LABEL", "data.download=false"], 2,
     "cannot use IDX_LABEL/MNIST/raw/train-labels-idx1-ubyte: it holds the label 12; labels must be 0..9"),
    ("resume without the checkpoint's data", ["train.resume=IDXRUN", "data=mnist", "data.root=EMPTY", "data.download=false", "train.epochs=3"], 2,
     "mnist not found under EMPTY/MNIST/raw"),
    # 8. every constructor argument, by one mechanism: signatures, then a dry build
    ("seed -1", ["seed=-1"], 2, "seed=-1 is not allowed: use a whole number from 0 to 4,294,967,295"),
    ("negative weight decay", ["optim.weight_decay=-0.1"], 2,
     "optim (torch.optim.Adam) refuses these settings: Invalid weight_decay value: -0.1. Fix optim: lr=0.001, weight_decay=-0.1"),
    ("Adam betas outside [0, 1)", ["+optim.betas=[0.9,1.5]"], 2,
     "optim (torch.optim.Adam) refuses these settings: Invalid beta parameter at index 1: 1.5"),
    ("negative SGD momentum", ["optim=sgd", "optim.momentum=-1"], 2, "optim (torch.optim.SGD) refuses these settings: Invalid momentum value: -1"),
    ("step_size 0", ["scheduler.step_size=0"], 2,
     "scheduler (torch.optim.lr_scheduler.StepLR) refuses these settings: integer modulo by zero. Fix scheduler: step_size=0, gamma=0.1"),
    ("T_max 0", ["scheduler=cosine", "scheduler.T_max=0"], 2,
     "scheduler (torch.optim.lr_scheduler.CosineAnnealingLR) refuses these settings: integer modulo by zero. Fix scheduler: T_max=0"),
    ("base_channels 0", ["model.base_channels=0"], 2, "model.base_channels=0 is not allowed: use a whole number >= 1"),
    # Hydra's own hint for a key it does not know is to add it with +; the key would then be read by no one.
    ("a misspelt training setting added with +", ["+train.epoch=5"], 2,
     "train.epoch is not a setting vae_lab reads, so it would be ignored (did you mean train.epochs?)"),
    ("a misspelt evaluation setting added with +", ["+evaluate.iw_sample=5"], 2, "evaluate.iw_sample is not a setting vae_lab reads"),
    ("a misspelt top-level setting added with +", ["+seeed=3"], 2, "seeed is not a setting vae_lab reads, so it would be ignored (did you mean seed?)"),
    ("a misspelt task node added with +", ["+trian.epochs=3"], 2, "trian is not a setting vae_lab reads, so it would be ignored (did you mean train?)"),
    ("unknown argument of a model", ["+model.depth=3"], 2,
     "model: vae_lab.model.ConvVAE does not accept these settings (got an unexpected keyword argument 'depth')"),
    ("a new group's bad argument", ["trusted_modules=[torch.nn]", "+sampler._target_=torch.nn.Linear", "+sampler.in_features=4", "+sampler.out_features=-2"], 2,
     "sampler (torch.nn.Linear) refuses these settings: Trying to create tensor with negative dimension -2"),
    ("a new group's unknown argument", ["trusted_modules=[torch.nn]", "+sampler._target_=torch.nn.Linear", "+sampler.in_features=4", "+sampler.out_features=2", "+sampler.scale=1"], 2,
     "sampler: torch.nn.Linear does not accept these settings (got an unexpected keyword argument 'scale')"),
    ("unknown target", ["model._target_=vae_lab.model.Transformer"], 2,
     "model._target_='vae_lab.model.Transformer' cannot be imported (module 'vae_lab.model' has no attribute 'Transformer')"),
    ("unknown compile backend", ["train.compile=turbo"], 2, "train.compile='turbo' is not a torch.compile backend here: use true, false or one of"),
    ("number as the checkpoint path", ["task=evaluate", "evaluate.checkpoint=123"], 2,
     "evaluate.checkpoint=123 is not allowed: use a path or null (quote a name that looks like a number: 'evaluate.checkpoint=\"123\"')"),
    ("number as the classifier cache folder", ["evaluate.cache_dir=123"], 2,
     "evaluate.cache_dir=123 is not allowed: use a path (quote a name that looks like a number"),
    ("number as the TensorBoard folder", ["logger=tensorboard", "logger.tensorboard.subdir=5"], 2,
     "logger.tensorboard.subdir=5 is not allowed: use text"),
    ("number as the MLflow store", ["logger=mlflow", "logger.mlflow.tracking_uri=7"], 2, "logger.mlflow.tracking_uri=7 is not allowed: use text"),
    ("MLflow store that is not a database", ["logger=mlflow", "logger.mlflow.tracking_uri=sqlite:///TEXT"], 2,
     "logger.mlflow.tracking_uri=sqlite:///TEXT: TEXT is not an SQLite database"),
    ("MLflow store that is a folder", ["logger=mlflow", "logger.mlflow.tracking_uri=sqlite:///EMPTY"], 2,
     "logger.mlflow.tracking_uri=sqlite:///EMPTY: EMPTY is a folder"),
    ("unknown MLflow setting", ["logger=mlflow", "+logger.mlflow.colour=red"], 2,
     "logger.mlflow: vae_lab.loggers.MLflowLogger does not accept these settings (got an unexpected keyword argument 'colour')"),
    ("number as the resume path", ["train.resume=5"], 2, "train.resume=5 is not allowed: use a path or null"),
    ("number as the data root", ["data.root=7"], 2, "data.root=7 is not allowed: use a path"),
    ("number as the device", ["device=5"], 2, "device=5 is not allowed: use auto, cpu, cuda, cuda:N or mps"),
    ("amp not a boolean", ["train.amp=3"], 2, "train.amp=3 is not allowed: use true or false"),
    ("absurd latent size", ["model.latent_dim=1000000000"], 2,
     "model (vae_lab.model.ConvVAE) with these settings has 194,000,093,377 parameters, which need about 2,891 GiB to train"),
    ("images too large for a model sized from them", ["data=shapes", "data.image_size=100000"], 2,
     "Use smaller model.* sizes or smaller images: the model sizes itself from them (3 x 100000 x 100000)"),
    ("absurd hidden size", ["model=mlp_vae", "model.hidden_dim=100000000"], 2,
     "model (vae_lab.model.MLPVAE) with these settings has 163,000,000,824 parameters"),
    ("a likelihood whose decoder outputs exhaust memory", ["loss.reconstruction={_target_:vae_lab.likelihoods.DiscretizedLogistic,components:100000}"], 2,
     "train.batch_size=64 images decode 64 images per training step, 300,000 decoder outputs per pixel for loss.reconstruction"),
    ("instantiate keyword in a likelihood node", ["loss.reconstruction={_target_:vae_lab.likelihoods.Gaussian,_partial_:true}"], 2,
     "loss.reconstruction: _partial_ is not allowed in a node a config builds inside a group"),
    ("IWAE samples that exhaust memory", ["loss=iwae", "loss.k=20000"], 2,
     "loss.k=20000 importance samples x train.batch_size=64 images decode 1,280,000 images per training step"),
    ("more threads than cores", ["threads=100000"], 2, "threads=100000 is not allowed: use auto (the cores free now), null (torch's default) or a whole number from 1 to"),
    ("a TensorBoard folder over the results", ["logger=tensorboard", "logger.tensorboard.subdir=results"], 2,
     "logger.tensorboard.subdir='results' is where vae_lab writes results"),
    ("absurd figure size", ["task=evaluate", "evaluate.checkpoint=RUN", "evaluate.generation_samples=1000000000"], 2,
     "evaluate.generation_samples=1000000000 is not allowed: use a whole number from 1 to 10,000"),
    # 9. small data: the figures adapt or are skipped with a note; the run finishes
    ("test split smaller than a grid row", ["data.limit=15", "train.evaluate_at_end=true"], 0, None),
    ("images_per_row larger than the test split", ["data.limit=20", "evaluate.images_per_row=64", "train.evaluate_at_end=true"], 0, None),
    ("one embedding point", ["data.limit=20", "evaluate.embedding_points=1", "train.evaluate_at_end=true"], 0,
     "latent_embedding.png not drawn: reducing the 16-D latent means to 2 dimensions needs more than 2 test images, and there are 1"),
    ("t-SNE on fewer points than its perplexity", ["data.limit=20", "evaluate.embedding=tsne", "evaluate.embedding_points=10",
                                                   "train.evaluate_at_end=true"], 0, None),
    ("a single test image", ["data.limit=1", "train.evaluate_at_end=true"], 0,
     "latent_traversal.png not drawn: interpolating needs at least 2 test images, and there is 1"),
    ("a Gaussian mixture on a single training code", ["data.limit=1", "evaluate.samplers=[prior,gmm]", "train.evaluate_at_end=true"], 0,
     "the gmm sampler is left out (no random_generation_gmm.png, no metrics): a Gaussian mixture needs at least 2 training codes, and there is 1"),
    # 11. summarize: every readable job is summarised, the bad one named, exit status 1
    ("summarize: truncated job.json", ["task=summarize", "summarize.sweep_dir=SWEEP_TRUNCATED"], 1,
     "1 of 2 jobs could not be read; the summary lists the other jobs in full: job 1: job.json cannot be read (Unterminated string"),
    ("summarize: job.json that is a list", ["task=summarize", "summarize.sweep_dir=SWEEP_LIST"], 1,
     "job 1: job.json holds a list, not a JSON object"),
    ("summarize: unreadable metrics.json", ["task=summarize", "summarize.sweep_dir=SWEEP_BINARY"], 1,
     "job 1: results/metrics.json cannot be read ('utf-8' codec can't decode byte 0xff"),
    ("summarize: half-written last row", ["task=summarize", "summarize.sweep_dir=SWEEP_HALFROW"], 1,
     "job 1: metrics.csv line 3 is incomplete or damaged (half-written?)"),
]
# Through run.py (forked from a server that has imported the libraries, tests/forked.py): what Hydra
# decides (composition, directories, sweeps), and a few validation cases end to end. Everything else
# runs in this process through run_task, as the CLI calls it.
END_TO_END = {
    "unknown key (Hydra)", "unknown group option (Hydra)", "sweep into a used sweep directory", "run directory already used",
    "evaluate into a used run directory", "run directory under a file", "used run directory named with an interpolation",
    "used run directory named in quotes", "evaluate into a training run, by interpolation", "sweep with a constant subdir",
    "sweep subdir that leaves out the swept key", "sweep subdir by overrides with a repeated value",
    "used sweep directory named with an interpolation",
    "batch size 0", "missing checkpoint", "negative weight decay", "truncated IDX file",
    "override Hydra cannot parse", "YAML syntax error in a user config", "a group option that is a number (Hydra)",
    "a config file that is not UTF-8", "Optuna storage that is not a database",
}


class Payload:
    """Unpickling this runs code: it writes the file it names."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_job(sweep: Path, name: str, source: Path, job_json: str | None = None, metrics_json: bytes | None = None,
             metrics_csv: str | None = None) -> None:
    """A sweep job folder from a finished run's files, with any of them replaced."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / "results").mkdir()
    (job / ".hydra" / "overrides.yaml").write_text(f"- train.alpha={name}\n")
    (job / "job.json").write_text(job_json if job_json is not None else '{"status": "completed", "error": "", "seconds": 1.5}\n')
    (job / "results" / "metrics.json").write_bytes(metrics_json if metrics_json is not None else (source / "results" / "metrics.json").read_bytes())
    (job / "metrics.csv").write_text(metrics_csv if metrics_csv is not None else (source / "metrics.csv").read_text())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A trained tiny run, and every kind of bad file a user could point at."""
    root = tmp_path_factory.mktemp("files")
    run = root / "run"  # a copy of the workers' shared run: the cases name folders beside it
    shutil.copytree(shared_run(tmp_path_factory, "train.evaluate_at_end=true", "data.limit=64", "train.epochs=1", "figures=true"), run)
    good = run / "checkpoints" / "last.pt"
    files = {"RUN": run, "ROOT": root, "EMPTY": root / "empty", "MISSING": root / "missing.pt", "TEXT": root / "notes.txt",
             "TRUNCATED": root / "truncated.pt", "FOREIGN": root / "foreign.pt", "ALTERED": root / "altered.pt",
             "MALICIOUS": root / "malicious.pt", "EVILCONFIG": root / "evilconfig.pt", "MARKER": root / "payload-ran"}
    files["EMPTY"].mkdir()
    files["SWEEP"] = root / "sweep"
    files["SWEEP"].mkdir()
    (files["SWEEP"] / "notes.md").write_text("a sweep's notes\n")
    files["TEXT"].write_text("not a checkpoint\n")
    files["USERCONF"] = root / "userconf"
    (files["USERCONF"] / "experiment").mkdir(parents=True)
    (files["USERCONF"] / "experiment" / "broken.yaml").write_text("model:\n  latent_dim: [3\n")
    files["LATIN1CONF"] = root / "latin1conf"
    (files["LATIN1CONF"] / "experiment").mkdir(parents=True)
    (files["LATIN1CONF"] / "experiment" / "latin1.yaml").write_bytes(b"train:\n  epochs: \xff\xfe1\n")
    files["FAKEDB"] = root / "fake.db"
    files["FAKEDB"].write_bytes(b"SQLite format 3\x00" + b"garbage" * 20)
    files["TRUNCATED"].write_bytes(good.read_bytes()[:5000])
    torch.save({"weights": torch.zeros(3)}, files["FOREIGN"])
    state = load_checkpoint(good)
    altered = dict(state, config={**state["config"], "model": {**state["config"]["model"], "latent_dim": 5}})
    save_checkpoint(altered, files["ALTERED"])
    torch.save({"format": "vae_lab/1", "epoch": 1, "model": Payload(files["MARKER"]), "config": {}}, files["MALICIOUS"])
    evil = dict(state, config={**state["config"], "model": {"_target_": "os.system", "command": f"touch {files['MARKER']}"}})
    save_checkpoint(evil, files["EVILCONFIG"])
    # Small IDX data sets: a good one (and a run trained on it), and one per kind of damage.
    write_idx_files(root / "idx")
    run_task(compose_config("data=mnist", f"data.root={root / 'idx'}", "data.download=false", "train.epochs=1"), root / "idxrun")
    files["IDXRUN"] = root / "idxrun" / "checkpoints" / "last.pt"
    for what, name, damage, _ in DAMAGE:
        key = {"truncated": "IDX_TRUNCATED", "wrong magic": "IDX_MAGIC", "count mismatch": "IDX_COUNT", "label out of range": "IDX_LABEL"}[what]
        files[key] = root / key.lower()
        damage(write_idx_files(files[key]) / name)
    # Sweeps with one good job and one damaged job each.
    csv_rows = (run / "metrics.csv").read_text()
    damaged_jobs = {"SWEEP_TRUNCATED": {"job_json": '{"status": "comp'}, "SWEEP_LIST": {"job_json": "[1, 2]\n"},
                    "SWEEP_BINARY": {"metrics_json": b"\x00\xff\xfe"}, "SWEEP_HALFROW": {"metrics_csv": csv_rows + "2,0.001,60"}}
    for key, damage in damaged_jobs.items():
        files[key] = root / key.lower()
        make_job(files[key], "0", run)
        make_job(files[key], "1", run, **damage)
    return files


def folder_name(case: str) -> str:
    """A run directory of its own per case: its place in the catalogue, then its words."""
    number = [name for name, *_ in CATALOGUE].index(case)
    return f"{number:02d}_" + re.sub(r"\W+", "_", case)


def substitute(text: str, files: dict) -> str:
    for name in sorted(files, key=len, reverse=True):
        text = text.replace(name, str(files[name]))
    return text


class Notes(logging.Handler):
    """Collects what vae_lab logs at WARNING and above, as a user reads it on the console."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run_in_process(overrides: list[str], run_dir: Path) -> tuple[int, str]:
    """The CLI's path without the process: compose, run_task; a VaeLabError is the one line the user reads."""
    notes = Notes()
    logging.getLogger("vae_lab").addHandler(notes)
    try:
        run_task(compose_config(*overrides), run_dir)
        status, message = 0, ""
    except VaeLabError as error:
        status, message = getattr(error, "exit_code", 2), str(error)
    finally:
        logging.getLogger("vae_lab").removeHandler(notes)
    return status, "\n".join([message, *notes.lines])


def run_end_to_end(overrides: list[str], run_dir: Path) -> tuple[int, str]:
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        overrides = [*overrides, f"hydra.run.dir={run_dir}"]
    flags = [o for o in overrides if o.startswith("-")]  # Hydra's flags (-m, --config-dir=...) go before the overrides
    overrides = [o for o in overrides if not o.startswith("-")]
    result = run_py(["run.py", *flags, *TINY, *overrides])
    return result.returncode, result.stdout + result.stderr


class Catalogue:
    """The catalogue's results, run when a test first asks: in-process cases one at a time, the
    run.py cases (the slow tier) all together, four processes at a time."""

    def __init__(self, files: dict, runs: Path):
        self.files, self.runs, self.results = files, runs, {}
        self.before = digest(files["RUN"])

    def case_files(self, name: str) -> dict:
        return {**self.files, "CASE": self.runs / (folder_name(name) + "_own")}

    def result(self, name: str) -> tuple[int, str]:
        if name not in self.results:
            if name in END_TO_END:
                with ThreadPoolExecutor(max_workers=4) as pool:
                    self.results.update(pool.map(lambda case: self._run(case, run_end_to_end),
                                                 [c for c in CATALOGUE if c[0] in END_TO_END]))
            else:
                self.results.update([self._run(next(c for c in CATALOGUE if c[0] == name), run_in_process)])
        return self.results[name]

    def _run(self, case, runner) -> tuple[str, tuple[int, str]]:
        name, overrides, _, _ = case
        # Figures on: the cases that finish are about figures adapting to small data.
        return name, runner(["figures=true", *(substitute(o, self.case_files(name)) for o in overrides)], self.runs / folder_name(name))


@pytest.fixture(scope="module")
def catalogue(files, tmp_path_factory):
    return Catalogue(files, tmp_path_factory.mktemp("cases"))


def test_the_catalogue_runs_a_few_cases_end_to_end():
    assert END_TO_END | SLOW_IN_PROCESS <= {name for name, *_ in CATALOGUE}
    assert 10 <= len(END_TO_END) <= len(CATALOGUE) // 3


# In-process cases in the slow tier: small-data figure cases whose mechanism (a figure adapts or is skipped
# with a note) the fast tier checks with "a single test image" and "images_per_row larger than the test split".
SLOW_IN_PROCESS = {"test split smaller than a grid row", "one embedding point", "t-SNE on fewer points than its perplexity",
                   "a Gaussian mixture on a single training code"}
# The run.py cases run together (see Catalogue.result), so they share one xdist worker: split
# over two, each worker would run the whole batch of subprocesses.
END_TO_END_WORKER = pytest.mark.xdist_group("catalogue-end-to-end")
CASES = [pytest.param(*case, id=case[0], marks=[pytest.mark.slow, END_TO_END_WORKER] if case[0] in END_TO_END
                      else [pytest.mark.slow] if case[0] in SLOW_IN_PROCESS else [])
         for case in CATALOGUE]


@pytest.mark.parametrize("name, overrides, status, message", CASES)
def test_bad_input_ends_in_one_clear_message(catalogue, name, overrides, status, message):
    returncode, output = catalogue.result(name)
    assert returncode == status, output[-2000:]
    # Whatever the case did, the finished run its overrides point at is unchanged and no payload ran
    # (checked per case, so it holds whichever worker and order the cases run in).
    assert digest(catalogue.files["RUN"]) == catalogue.before, f"{name} changed the files of the run it was given"
    assert not catalogue.files["MARKER"].exists(), f"{name} ran the payload"
    if message is not None:
        assert substitute(message, catalogue.case_files(name)) in output
    assert "Traceback" not in output
    run_dir = catalogue.runs / folder_name(name)
    if status == 0:  # the run finished: its figures adapted to the small data, or were skipped with the note
        report = json.loads((run_dir / "results" / "metrics.json").read_text())
        assert report["test_images"] >= 1 and (run_dir / "results" / "reconstruction.png").is_file()
    elif run_dir.exists():  # nothing beyond Hydra's own record of the config
        written = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
        assert written <= HYDRA_RECORD | TRAINING_STARTED.get(name, set()), written


@pytest.mark.slow
@END_TO_END_WORKER
@pytest.mark.parametrize("name", ["sweep with a constant subdir", "sweep subdir that leaves out the swept key",
                                  "sweep subdir by overrides with a repeated value"])
def test_a_sweep_whose_jobs_share_a_folder_wrote_no_job(catalogue, name):
    assert catalogue.result(name)[0] == 2
    assert not catalogue.case_files(name)["CASE"].exists()


def test_summarize_writes_every_readable_job_and_names_the_damaged_one(catalogue, files):
    for name in [c[0] for c in CATALOGUE if c[0].startswith("summarize:")]:
        catalogue.result(name)  # writes the summaries read below
    for key in ("SWEEP_TRUNCATED", "SWEEP_LIST", "SWEEP_BINARY", "SWEEP_HALFROW"):
        with (files[key] / "summary.csv").open() as file:
            rows = list(csv.DictReader(file))
        assert [row["status"] for row in rows] == ["completed", "unreadable"], key
        assert float(rows[0]["neg_elbo"]) == json.loads((files["RUN"] / "results" / "metrics.json").read_text())["neg_elbo"]
        assert rows[1]["error"] and rows[1]["error"] in (files[key] / "summary.md").read_text()


def test_a_malicious_checkpoint_is_refused_without_running_its_payload(files, tmp_path):
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(files["MALICIOUS"])
    # The same payload pickled plainly (torch's legacy format) is refused too.
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"model": Payload(files["MARKER"])}))
    with pytest.raises(CheckpointError, match="not a PyTorch file"):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="model is built by 'os.system', and os is not a trusted module"):
        run_task(compose_config("task=evaluate", f"evaluate.checkpoint={files['EVILCONFIG']}"), tmp_path / "run")
    assert not files["MARKER"].exists()


def test_a_nan_loss_keeps_the_last_good_checkpoint_and_says_how_to_resume(monkeypatch, tmp_path):
    from vae_lab.objectives import ELBO

    real, calls = ELBO.__call__, {"n": 0}

    def poisoned(self, model, x, noise=None):
        terms = real(self, model, x, noise)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 7:  # 4 training steps per epoch: step 3 of epoch 2
                return type(terms)(terms.total * float("nan"), terms.recon, terms.kl)
        return terms

    monkeypatch.setattr(ELBO, "__call__", poisoned)  # the objective the train task hands the engine
    with pytest.raises(VaeLabError) as error:
        run_task(compose_config("train.epochs=3"), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    assert str(error.value) == (
        f"training diverged: the loss is nan at step 3 of epoch 2. {last} holds epoch 1; continue with: "
        f"python run.py task=train train.resume={last} train.epochs=3 Lower optim.lr (or train.alpha) before continuing."
    )
    assert load_checkpoint(last)["epoch"] == 1


def test_a_full_disk_keeps_earlier_checkpoints(monkeypatch, tmp_path):
    import vae_lab.checkpoint as checkpoint

    real, calls = checkpoint.torch.save, {"n": 0}

    def save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # last.pt, model_1.pt, then last.pt of epoch 2
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(VaeLabError, match=r"in epoch 2: No space left on device\. .*last.pt holds epoch 1; continue with"):
        run_task(compose_config("train.checkpoint_every=1"), tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "checkpoints" / "model_1.pt")["epoch"] == 1
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def start_training(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "run.py", *TINY, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


SLOW_RUN = ["train.epochs=30", "data.limit=128", "train.batch_size=16", "train.checkpoint_every=1000", "train.plot_every=1000"]


@pytest.mark.slow
def test_sigterm_stops_at_a_checkpoint_and_resuming_gives_the_same_weights(tmp_path):
    interrupted = tmp_path / "interrupted"
    process = start_training(interrupted, *SLOW_RUN)
    wait_for(interrupted / "checkpoints" / "last.pt", process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    last = interrupted / "checkpoints" / "last.pt"
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    epoch = load_checkpoint(last)["epoch"]
    assert 1 <= epoch < 30
    assert f"{last} holds epoch {epoch}; continue with: python run.py task=train train.resume={last} train.epochs=30" in output
    assert "Traceback" not in output

    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    run_task(compose_config(*SLOW_RUN, f"train.resume={last}"), resumed)
    run_task(compose_config(*SLOW_RUN), straight)
    expected = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    for key, tensor in load_checkpoint(resumed / "checkpoints" / "last.pt")["model"].items():
        assert torch.equal(tensor, expected[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.13, 0.41])
def test_sigkill_at_any_moment_leaves_a_loadable_last_checkpoint(tmp_path, delay):
    run_dir = tmp_path / "run"
    process = start_training(run_dir, "train.epochs=500", "data.limit=32", "train.batch_size=32", "train.checkpoint_every=1", "train.plot_every=1000")
    wait_for(run_dir / "checkpoints" / "last.pt", process)
    time.sleep(delay)
    process.kill()
    process.communicate(timeout=60)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] >= 1
    for periodic in (run_dir / "checkpoints").glob("model_*.pt"):
        assert load_checkpoint(periodic)["epoch"] == int(periodic.stem.split("_")[1])


# --- 3 and 12: one process per run directory; a refused start does not block its retry ------------


def test_the_directory_guard_fails_closed(capsys, caplog):
    """Hydra turns a callback's exception into a warning and runs on: the guard must stop instead."""
    from omegaconf import OmegaConf

    from vae_lab.rundir import RunDirectoryGuard

    broken = OmegaConf.create({"hydra": {"run": {"dir": "${no_such_key}"}, "output_subdir": ".hydra"}})
    with pytest.raises(SystemExit) as stopped:
        RunDirectoryGuard().on_run_start(broken)
    assert stopped.value.code == 2
    assert "could not check the run directory" in capsys.readouterr().err + caplog.text  # stderr, or Hydra's log


@pytest.mark.slow
def test_a_second_process_is_refused_naming_the_first_and_a_killed_holder_frees_the_directory(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from vae_lab.rundir import claim; "
                               "lock = claim(Path(sys.argv[1]), 'hydra.run.dir'); print('locked', flush=True); time.sleep(300)", str(run_dir)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = run_py(["run.py", *TINY, f"hydra.run.dir={run_dir}"])
        assert second.returncode == 2, second.stderr[-2000:]
        output = second.stdout + second.stderr
        assert f"hydra.run.dir={run_dir} is in use by another vae_lab process (pid {holder.pid})" in output
        assert "Traceback" not in output and not (run_dir / ".hydra").exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the lock file stays behind
        holder.wait()
    assert (run_dir / LOCK_FILE).is_file()
    third = run_py(["run.py", *TINY, "train.epochs=1", "data.limit=32", f"hydra.run.dir={run_dir}"])
    assert third.returncode == 0, third.stderr[-2000:]
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("record", [".hydra", "my_record"])  # Hydra's default record folder, and one the user named
def test_a_refused_command_does_not_block_its_corrected_retry(tmp_path, record):
    run_dir = tmp_path / "run"
    where = [f"hydra.run.dir={run_dir}", f"hydra.output_subdir={record}"]
    refused = run_py(["run.py", *TINY, "train.batch_size=0", *where])
    assert refused.returncode == 2 and (run_dir / record / "overrides.yaml").is_file()
    retried = run_py(["run.py", *TINY, "train.epochs=1", "data.limit=32", *where])
    assert retried.returncode == 0, retried.stderr[-2000:]
    assert "train.batch_size=0" not in (run_dir / record / "overrides.yaml").read_text()  # the record is the retry's
    assert (run_dir / "metrics.csv").is_file()


# --- 6. signals outside the training loop: one message, no staging folder, 128 + signal ------------


def wait_for_staging(run_dir: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    """Until the hidden results folder that evaluation writes into appears."""
    deadline = time.monotonic() + timeout
    while not list(run_dir.glob(".results-*")):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "evaluation never started writing its figures"
        time.sleep(0.005)


def assert_interrupted(process: subprocess.Popen, number: int, run_dir: Path) -> str:
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + number, output[-2000:]
    assert "Traceback" not in output
    assert f"interrupted by {signal.Signals(number).name}" in output
    assert not list(run_dir.glob(".results-*")) and not (run_dir / "results").exists()
    return output


# An evaluation slow enough to be interrupted in its figures (the tiny runs leave figures out).
SLOW_FIGURES = ["figures=true", "evaluate.embedding=tsne", "data.limit=256", "evaluate.embedding_points=256"]


@pytest.mark.slow
def test_ctrl_c_during_evaluation_leaves_no_staging_folder(files, tmp_path):
    run_dir = tmp_path / "evaluation"
    process = subprocess.Popen([sys.executable, "run.py", *TINY, "task=evaluate", f"evaluate.checkpoint={files['RUN']}", *SLOW_FIGURES,
                                f"hydra.run.dir={run_dir}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_staging(run_dir, process)
    process.send_signal(signal.SIGINT)
    output = assert_interrupted(process, signal.SIGINT, run_dir)
    assert "before task=evaluate finished" in output


@pytest.mark.slow
def test_sigterm_during_the_end_of_run_evaluation_keeps_the_training_and_says_how_to_evaluate(tmp_path):
    run_dir = tmp_path / "run"
    process = start_training(run_dir, "train.epochs=1", "train.evaluate_at_end=true", *SLOW_FIGURES)
    wait_for_staging(run_dir, process)
    process.send_signal(signal.SIGTERM)
    output = assert_interrupted(process, signal.SIGTERM, run_dir)
    assert f"Training had finished; evaluate it with: python run.py task=evaluate evaluate.checkpoint={run_dir}" in output
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1


def catches_sigterm(pid: int) -> bool:
    """Whether the process has installed its own SIGTERM handler (Linux: SigCgt in /proc/<pid>/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc to see when the command's own code runs")
def test_ctrl_c_during_startup_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    process = start_training(run_dir)
    # vae_lab's first line installs its SIGTERM handler; from then on (imports of Hydra and torch,
    # composing the config) an interrupt is one line. Before it, Python itself is still starting.
    deadline = time.monotonic() + 60
    while not catches_sigterm(process.pid):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, output[-2000:]
    assert "interrupted by SIGINT" in output and "Traceback" not in output
    assert not (run_dir / "checkpoints").exists()


def test_a_task_refuses_a_config_without_what_it_reads(make_cfg):
    """~data (or data=null) before task=evaluate: evaluation reads the data's location from the command line."""
    from omegaconf import open_dict

    from vae_lab.validate import validate

    cfg = make_cfg("task=evaluate", "evaluate.checkpoint=x.pt")
    with open_dict(cfg):
        del cfg["data"]
    with pytest.raises(ConfigError, match=re.escape("data is not in the config (removed with ~data, or set to a plain value), "
                                                    "and task=evaluate needs it")):
        validate(cfg)
