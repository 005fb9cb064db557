"""Bad input, interrupted runs and untrusted files, through the real CLI where a user meets them."""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, compose_config
from vae_lab.checkpoint import load_checkpoint, save_checkpoint
from vae_lab.cli import run_task
from vae_lab.errors import CheckpointError, VaeLabError

HYDRA_RECORD = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "run.log"}
TRAINING_STARTED = {"diverging training (NaN)": {"metrics.csv"}}  # may write what the run had begun
CUDA_MESSAGE = "device=cuda:7 but this machine has"

# (id, overrides, exit status, message). Upper-case words are files made by the `files` fixture.
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
     "evaluate.iw_samples=0 is not allowed: use a whole number >= 1"),
    ("data.limit 0", ["data.limit=0"], 2, "data.limit=0 is not allowed: use null (all images) or a whole number >= 1"),
    ("data root is a file", ["data=mnist", "data.root=TEXT"], 2, "data.root=TEXT is a file: point it at the folder that holds MNIST/raw"),
    ("unknown binarize", ["data.binarize=yes"], 2, "data.binarize='yes' is not allowed: use one of none, static, dynamic"),
    ("unknown task", ["task=predict"], 2, "task='predict' is not allowed: use one of train, evaluate, summarize"),
    ("unknown return metric", ["train.return_metric=accuracy"], 2, "train.return_metric='accuracy' is not allowed: use one of test_loss, test_neg_elbo"),
    ("unknown key (Hydra)", ["train.lr=0.1"], 1, "Could not override 'train.lr'.\nTo append to your config use +train.lr=0.1\nKey 'lr' is not in struct"),
    ("unknown group option (Hydra)", ["model=transformer"], 1, "Could not find 'model/transformer'\n\nAvailable options in 'model':\n\tconv_vae\n\tmlp_vae"),
    ("evaluate without checkpoint", ["task=evaluate"], 2, "evaluate.checkpoint is not set: pass evaluate.checkpoint=PATH"),
    ("missing checkpoint", ["task=evaluate", "evaluate.checkpoint=MISSING"], 2, "no checkpoint at MISSING: the file does not exist"),
    ("folder without checkpoints", ["task=evaluate", "evaluate.checkpoint=EMPTY"], 2, "EMPTY is a folder without checkpoints"),
    ("truncated checkpoint", ["task=evaluate", "evaluate.checkpoint=TRUNCATED"], 2,
     "cannot read TRUNCATED: the file is truncated, corrupted or not a PyTorch file"),
    ("text file as checkpoint", ["task=evaluate", "evaluate.checkpoint=TEXT"], 2,
     "cannot read TEXT: the file is truncated, corrupted or not a PyTorch file"),
    ("sweep into a used sweep directory", ["-m", "train.alpha=0.1,1.0", "hydra.sweep.dir=SWEEP"], 2,
     "hydra.sweep.dir=SWEEP already holds files; refusing to write over them"),
    ("foreign PyTorch file", ["task=evaluate", "evaluate.checkpoint=FOREIGN"], 2, "FOREIGN is a PyTorch file but not a vae_lab checkpoint"),
    ("other architecture than its config", ["task=evaluate", "evaluate.checkpoint=ALTERED"], 2,
     "the weights in ALTERED do not fit the model its own config describes"),
    ("pickle that runs code", ["task=evaluate", "evaluate.checkpoint=MALICIOUS"], 2,
     "refused to load MALICIOUS: it holds Python objects that could run code when unpickled"),
    ("config that builds os.system", ["task=evaluate", "evaluate.checkpoint=EVILCONFIG"], 2,
     "refused EVILCONFIG: its config builds something vae_lab does not trust: model is built by 'os.system'"),
    ("resume from a missing file", ["train.resume=MISSING"], 2, "no checkpoint at MISSING: the file does not exist"),
    ("no data and no fallback", ["data=mnist", "data.root=EMPTY", "data.download=false", "data.fallback=false"], 2,
     "mnist not found under EMPTY/MNIST/raw and data.download=false"),
    ("run directory already used", ["hydra.run.dir=RUN"], 2, "hydra.run.dir=RUN already holds files; refusing to write over them"),
    ("evaluate into a used run directory", ["task=evaluate", "evaluate.checkpoint=RUN", "hydra.run.dir=RUN"], 2,
     "hydra.run.dir=RUN already holds files; refusing to write over them"),
    ("run directory under a file", ["hydra.run.dir=TEXT/run"], 2, "hydra.run.dir=TEXT/run: cannot create it (TEXT is a file)"),
    ("summarize a folder without jobs", ["task=summarize", "summarize.sweep_dir=EMPTY"], 2,
     "summarize.sweep_dir=EMPTY holds no Hydra jobs"),
    ("diverging training (NaN)", ["optim.lr=1e6", "train.epochs=2"], 2,
     "training diverged: the loss is nan at step 2 of epoch 1. No checkpoint was written. Lower optim.lr"),
]


class Payload:
    """Unpickling this runs code: it writes the file it names."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A trained tiny run, and every kind of bad file a user could point at."""
    root = tmp_path_factory.mktemp("files")
    run = root / "run"
    run_task(compose_config("train.evaluate_at_end=true", "data.limit=64", "train.epochs=1"), run)
    good = run / "checkpoints" / "last.pt"
    files = {"RUN": run, "EMPTY": root / "empty", "MISSING": root / "missing.pt", "TEXT": root / "notes.txt",
             "TRUNCATED": root / "truncated.pt", "FOREIGN": root / "foreign.pt", "ALTERED": root / "altered.pt",
             "MALICIOUS": root / "malicious.pt", "EVILCONFIG": root / "evilconfig.pt", "MARKER": root / "payload-ran"}
    files["EMPTY"].mkdir()
    files["SWEEP"] = root / "sweep"
    files["SWEEP"].mkdir()
    (files["SWEEP"] / "multirun.yaml").write_text("hydra: {}\n")
    files["TEXT"].write_text("not a checkpoint\n")
    files["TRUNCATED"].write_bytes(good.read_bytes()[:5000])
    torch.save({"weights": torch.zeros(3)}, files["FOREIGN"])
    state = load_checkpoint(good)
    altered = dict(state, config={**state["config"], "model": {**state["config"]["model"], "latent_dim": 5}})
    save_checkpoint(altered, files["ALTERED"])
    torch.save({"format": "vae_lab/1", "epoch": 1, "model": Payload(files["MARKER"]), "config": {}}, files["MALICIOUS"])
    evil = dict(state, config={**state["config"], "model": {"_target_": "os.system", "command": f"touch {files['MARKER']}"}})
    save_checkpoint(evil, files["EVILCONFIG"])
    return files


def folder_name(case: str) -> str:
    """A run directory of its own per case: its place in the catalogue, then its words."""
    number = [name for name, *_ in CATALOGUE].index(case)
    return f"{number:02d}_" + re.sub(r"\W+", "_", case)


def substitute(text: str, files: dict) -> str:
    for name in sorted(files, key=len, reverse=True):
        text = text.replace(name, str(files[name]))
    return text


@pytest.fixture(scope="module")
def catalogue_results(files, tmp_path_factory):
    """Run the whole catalogue at once, four processes at a time; the run is shared by all cases."""
    runs = tmp_path_factory.mktemp("cases")
    before = digest(files["RUN"])

    def run(case):
        name, overrides, _, _ = case
        overrides = [substitute(o, files) for o in overrides]
        if not any(o.startswith("hydra.run.dir=") for o in overrides):
            overrides.append(f"hydra.run.dir={runs / folder_name(name)}")
        result = subprocess.run([sys.executable, "run.py", *TINY, *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)
        return name, result

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(pool.map(run, CATALOGUE))
    return results, runs, before


@pytest.mark.parametrize("name, overrides, status, message", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_ends_in_one_clear_message(catalogue_results, files, name, overrides, status, message):
    results, runs, _ = catalogue_results
    result = results[name]
    output = result.stdout + result.stderr
    assert result.returncode == status, output[-2000:]
    assert substitute(message, files) in output
    assert "Traceback" not in output
    run_dir = runs / folder_name(name)
    if run_dir.exists():  # nothing beyond Hydra's own record of the config
        written = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
        assert written <= HYDRA_RECORD | TRAINING_STARTED.get(name, set()), written


def test_the_catalogue_overwrote_nothing_and_ran_no_payload(catalogue_results, files):
    _, _, before = catalogue_results
    assert digest(files["RUN"]) == before
    assert not files["MARKER"].exists()


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
