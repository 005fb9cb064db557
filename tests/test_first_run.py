"""A newcomer's first hour: install from a wheel, the quick recipe, the README's promises, Ctrl-C."""
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from setuptools import find_packages

import vae_lab.engine as engine
import vae_lab.train as train_task
from conftest import REPO, assert_png, read_metrics
from vae_lab.data import as_float, load_dataset
from vae_lab.layout import RUN_ENTRIES, RunLayout
from vae_lab.model import MLPVAE
from vae_lab.objectives import ELBO
from vae_lab.outcome import FACTOR_FIGURES, REFERENCE_FIGURES, closing_block, training_outcome

# What runs and builds leave at the top of a checkout (conf/data/ is source: only the top level is skipped).
NOT_SOURCE_AT_TOP = {".git", ".venv", "outputs", "multirun", "data", "build", "dist", ".pytest_cache"}


def not_source(folder: str, names: list[str]) -> set[str]:
    skipped = {name for name in names if name == "__pycache__" or name.endswith(".egg-info")}
    return skipped | (NOT_SOURCE_AT_TOP & set(names) if Path(folder) == REPO else set())
TINY_RUN = ["data=mnist_5k", "data.limit=64", "train.epochs=1", "train.batch_size=32", "device=cpu",
            "evaluate.iw_samples=2", "evaluate.embedding_points=64", "evaluate.reconstruction_rows=1", "evaluate.generation_samples=16"]


def test_setup_cfg_lists_every_package_and_ships_the_configs():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    listed = set(setup["options"]["packages"].split())
    assert listed == set(find_packages(str(REPO), include=["vae_lab", "vae_lab.*"])) | {"vae_lab.conf"}
    assert setup["options"]["package_dir"].split() == ["vae_lab.conf", "=", "conf"]
    assert "**/*.yaml" in setup["options.package_data"]["vae_lab.conf"]


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_finds_its_configs_and_trains(tmp_path):
    source, wheels, target, elsewhere = (tmp_path / name for name in ("source", "wheels", "target", "elsewhere"))
    shutil.copytree(REPO, source, ignore=not_source)  # the build writes build/ and *.egg-info: not into the checkout
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), "."],
                           cwd=source, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = wheels.glob("vae_lab-*.whl")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert (target / "vae_lab" / "conf" / "experiment" / "quick.yaml").is_file()
    assert not (target / "conf").exists()  # nothing at the top of site-packages

    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}  # the wheel's vae_lab, not a checkout's
    script = [str(target / "bin" / "vae-lab")]
    where = subprocess.run([sys.executable, "-c", "import vae_lab.cli as c; print(c.CONFIG_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.strip() == str((target / "vae_lab" / "conf").resolve())
    shown = subprocess.run([*script, "--help"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr[-3000:]
    assert "experiment: " in shown.stdout and "quick" in shown.stdout

    trained = subprocess.run([*script, *TINY_RUN], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run_dir,) = (elsewhere / "outputs").glob("*/*")
    assert_png(run_dir / "results" / "reconstruction.png")
    assert f"run directory: {run_dir.relative_to(elsewhere)}" in trained.stdout


def quick_recipe_duration() -> str:
    """The duration quick.yaml states, e.g. 'about 30 s on 2 CPU cores'."""
    text = (REPO / "conf" / "experiment" / "quick.yaml").read_text()
    return re.search(r"about \d+ s on 2 CPU cores", text).group(0)


def test_the_quick_recipes_duration_is_stated_the_same_everywhere():
    duration = quick_recipe_duration()
    help_text = subprocess.run([sys.executable, "run.py", "--help"], cwd=REPO, capture_output=True, text=True).stdout
    quick_help = next(line for line in help_text.splitlines() if "experiment=quick" in line)
    assert duration in quick_help
    readme = (REPO / "README.md").read_text()
    quick_lines = [line for line in readme.splitlines() if "experiment=quick" in line and re.search(r"\d+ s\b", line)]
    assert quick_lines and all(duration in line for line in quick_lines), quick_lines


def mean_image_neg_elbo(train_images: torch.Tensor, test_images: torch.Tensor) -> float:
    """-ELBO (nats per image) of a model that ignores its input: the decoder always outputs the
    mean training image and the KL is 0. A broken VAE (collapsed, grey blobs) sits at or above it."""
    train_images, test_images = as_float(train_images), as_float(test_images)  # 8-bit data are stored as uint8
    mean = train_images.mean(0, keepdim=True).clamp(1e-6, 1 - 1e-6).expand_as(test_images)
    return F.binary_cross_entropy(mean, test_images, reduction="none").flatten(1).sum(1).mean().item()


@pytest.mark.slow
def test_the_quick_recipe_learns_what_a_broken_model_cannot(tmp_path):
    result = subprocess.run([sys.executable, "run.py", "experiment=quick", f"hydra.run.dir={tmp_path}"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = load_dataset("mnist_5k")
    baseline = mean_image_neg_elbo(data.train_images, data.test_images)  # 208.5 nats
    report = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert report["test_images"] == len(data.test_images) == 1000
    assert report["neg_elbo"] < baseline - 50, (report["neg_elbo"], baseline)  # measured about 130
    assert report["iw_nll"] <= report["neg_elbo"] + 1.0
    assert report["active_units"] >= report["latent_dim"] // 2
    rows = read_metrics(tmp_path)
    assert float(rows[-1]["test_loss"]) < float(rows[0]["test_loss"]) - 30  # it kept learning
    for name in ("reconstruction.png", "random_generation.png", "latent_embedding.png"):
        assert_png(tmp_path / "results" / name)
    assert "fid_prior" not in report  # the sample-quality minute is left out of the quick check


def test_the_readme_links_stay_inside_the_repository():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    outside = [link for link in links if link.startswith("..") or link.startswith("/")]
    assert not outside, outside
    local = [link for link in links if "://" not in link]
    assert "docs/reference.md" in local
    assert all((REPO / link).exists() for link in local), [link for link in local if not (REPO / link).exists()]


def readme_run_files(readme: str) -> set[str]:
    """What the README says a run writes, relative to its run directory: every checkpoints/,
    progress/ or results/ file it names, and each entry of its run-directory tree (bare names on
    a line belong to that line's folder; `<N>`, `<epoch>` stand for a number)."""
    names = set(re.findall(r"\b(?:checkpoints|progress|results)/[\w<>]+\.(?:png|pt|json|csv)\b", readme))
    tree = readme.split("outputs/<date>/<time>/\n", 1)[1].split("```", 1)[0]
    for line in tree.splitlines():
        entries = re.split(r"\s{3,}", line.strip())[0]  # what follows a wide gap is the description
        found = re.findall(r"[\w<>/]+\.(?:png|pt|json|csv|log)\b|[\w.]+/", entries)
        if not found:
            continue
        folder = found[0].split("/")[0] + "/" if "/" in found[0].rstrip("/") else ""
        names |= {name if "/" in name else folder + name for name in found}
    return names


def test_the_files_the_readme_says_a_run_writes_are_the_layouts_names(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    named = readme_run_files(readme)
    assert {"checkpoints/last.pt", "results/metrics.json", "progress/loss_curves.png"} <= named, named  # the parser found them
    epochs = {int(number) for name in named for number in re.findall(r"_(\d+)\.", name)} | {7}
    layout = RunLayout(tmp_path)
    layout.progress.mkdir()
    model = MLPVAE(latent_dim=2)
    for epoch in epochs:  # the progress images as training draws them (names: RunLayout.progress_image)
        train_task._progress_images(model, torch.rand(4, 1, 28, 28), layout, epoch,
                                    OmegaConf.create({"evaluate": {"images_per_row": 2}}), NoLogger())
    relative = RunLayout(Path())
    written = {str(path.relative_to(tmp_path)) for path in layout.progress.iterdir()}
    written |= {*RUN_ENTRIES, *(str(relative.epoch_checkpoint(epoch)) for epoch in epochs),
                str(relative.last_checkpoint), str(relative.loss_curves), str(relative.report), str(relative.metrics_csv),
                *(str(relative.results / name) for name in (*REFERENCE_FIGURES, *FACTOR_FIGURES))}
    patterns = {name: "".join(r"\d+" if part.startswith("<") else re.escape(part) for part in re.split(r"(<\w+>)", name.rstrip("/")))
                for name in named}
    unknown = sorted(name for name, pattern in patterns.items() if not any(re.fullmatch(pattern, path) for path in written))
    assert not unknown, f"the README names files a run does not write: {unknown}"

    # The closing block of the quick check is what the framework prints for a run holding what it names.
    block = readme.split("```\nrun directory: ", 1)[1].split("\n```", 1)[0].splitlines()
    run_dir = Path(block[0])
    for name in block[1].split("open next: ", 1)[1].split():
        (tmp_path / run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / run_dir / name).touch()
    headline = re.fullmatch(r"  test -ELBO ([\d.]+) nats  \|  IW bound \(k=(\d+)\) ([\d.]+) nats  \|  active units (\d+)/(\d+)", block[2])
    assert headline, block[2]
    neg_elbo, k, iw_nll, active, latent = headline.groups()
    report = {"neg_elbo": float(neg_elbo), "iw_samples": int(k), "iw_nll": float(iw_nll),
              "active_units": int(active), "latent_dim": int(latent)}
    monkeypatch.chdir(tmp_path)
    printed = closing_block(training_outcome(run_dir, 0.0, {}, report))
    assert printed.splitlines() == [f"run directory: {block[0]}", *block[1:]], printed


class NoLogger:
    def log_images(self, tag, grid, epoch):
        pass


def test_an_interrupt_closes_the_progress_bar_before_the_message(monkeypatch):
    bars = []

    class RecordingBar(engine.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self.closed = False
            bars.append(self)

        def close(self):
            self.closed = True
            super().close()

    class Interrupted(ELBO):
        def __call__(self, model, x, noise=None):
            raise KeyboardInterrupt

    interrupted = Interrupted()

    monkeypatch.setattr(engine, "tqdm", RecordingBar)
    model = MLPVAE(latent_dim=2)
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(KeyboardInterrupt):
        engine.run_epoch(model, interrupted, torch.rand(8, 1, 28, 28), 4, optimizer=optimizer)
    assert len(bars) == 1 and bars[0].closed
    engine.run_epoch(model, ELBO(), torch.rand(8, 1, 28, 28), 4)  # and a pass that ends normally closes it too
    assert len(bars) == 2 and bars[1].closed
