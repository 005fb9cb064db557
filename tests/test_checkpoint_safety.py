"""Checkpoints as untrusted files: configs that try to run code, special files, full disks,
malformed or damaged files, and what an interrupted save leaves behind.

Every refusal is one CheckpointError (one line through the CLI, exit status 2) raised
before anything is built or written, and nothing a refused file names is touched.
"""
from __future__ import annotations

import copy
import errno
import functools
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, compose_config, shared_run
from forked import run_py
import vae_lab.checkpoint as checkpoint
import vae_lab.files
from vae_lab.checkpoint import MAX_CHECKPOINT_BYTES, load_checkpoint, save_checkpoint, tensors_digest
from vae_lab.cli import run_task
from vae_lab.errors import CheckpointError, ConfigError, VaeLabError
from vae_lab.loggers import CSVLogger

SMALL = ["data.limit=64", "train.epochs=1"]
RESOLVER = "${oc.create:{_target_: builtins.open, file: VICTIM, mode: w}}"
INTERPOLATION_REFUSED = "its config holds an interpolation or resolver"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny finished training run (shared by the workers: read only); its last.pt is the template of every crafted file."""
    return shared_run(tmp_path_factory, *SMALL)


@pytest.fixture
def state(trained) -> dict:
    return load_checkpoint(trained / "checkpoints" / "last.pt")


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file that a successful exploit would truncate."""
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


def craft(state: dict, path: Path) -> Path:
    """Write `state` exactly as given (as another program would), digest and all."""
    torch.save(state, path)
    return path


def evaluate(checkpoint_path: Path, run_dir: Path, *overrides: str):
    return run_task(compose_config("task=evaluate", f"evaluate.checkpoint={checkpoint_path}", *overrides), run_dir)


def with_config(state: dict, edit) -> dict:
    config = copy.deepcopy(state["config"])
    edit(config)
    return dict(state, config=config)


# ---------------------------------------------------------------------------------------------
# 1. A checkpoint's config is plain data: no interpolation, no resolver, no misplaced _target_.

def _extra_node(config, victim, value):
    config["extra"] = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    config["model"]["hidden_dim"] = value


# (id, edit of the saved config, message). VICTIM stands for the victim file's path.
CONFIG_EXPLOITS = [
    ("resolver creating a _target_ node (issue 9)",
     lambda c, v: c["model"].update(latent_dim=RESOLVER.replace("VICTIM", str(v))), INTERPOLATION_REFUSED),
    ("interpolation of an extra top-level node (issue 9)", lambda c, v: _extra_node(c, v, "${extra}"), INTERPOLATION_REFUSED),
    ("escaped interpolation", lambda c, v: _extra_node(c, v, "\\${extra}"), INTERPOLATION_REFUSED),
    ("interpolation nested in a list", lambda c, v: _extra_node(c, v, [1, {"deep": ["${extra}"]}]), INTERPOLATION_REFUSED),
    ("interpolation in a key", lambda c, v: (_extra_node(c, v, 64), c["model"].update({"${extra}": 1})),
     "its config holds an interpolation or resolver in the key '${extra}'"),
    ("environment resolver in the data group", lambda c, v: c["data"].update(binarize="${oc.env:HOME}"), INTERPOLATION_REFUSED),
    ("_target_ in an extra top-level node", lambda c, v: _extra_node(c, v, 64),
     "its config has _target_ at extra._target_, where vae_lab never writes one"),
    ("_target_ nested inside a group", lambda c, v: c["model"].update(act={"_target_": "builtins.open", "file": str(v), "mode": "w"}),
     "its config has _target_ at model.act._target_"),
    ("_target_ inside a list", lambda c, v: c["loss"].update(parts=[{"_target_": "builtins.open", "file": str(v), "mode": "w"}]),
     "its config has _target_ at loss.parts.0._target_"),
    ("instantiate keyword _args_", lambda c, v: c["model"].update(_args_=[str(v)]), "its config has _args_ at model._args_"),
    ("config value that is a tensor", lambda c, v: c["model"].update(latent_dim=torch.tensor(16)),
     "its config holds a Tensor at config.model.latent_dim"),
]


@pytest.mark.parametrize("name, edit, message", CONFIG_EXPLOITS, ids=[case[0] for case in CONFIG_EXPLOITS])
def test_a_config_that_could_build_something_is_refused_before_anything_is_built(state, victim, tmp_path, name, edit, message):
    crafted = craft(with_config(state, lambda config: edit(config, victim)), tmp_path / "crafted.pt")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        evaluate(crafted, tmp_path / "evaluated")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        run_task(compose_config(*SMALL, f"train.resume={crafted}", "train.epochs=2"), tmp_path / "resumed")
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "evaluated" / "results").exists()
    assert not (tmp_path / "resumed" / "checkpoints").exists()


@pytest.mark.slow
def test_the_resolver_exploit_through_run_py_is_one_line_and_exit_2(state, victim, tmp_path):
    crafted = craft(with_config(state, lambda c: c["model"].update(latent_dim=RESOLVER.replace("VICTIM", str(victim)))), tmp_path / "x.pt")
    result = run_py(["run.py", *TINY, "task=evaluate", f"evaluate.checkpoint={crafted}", f"hydra.run.dir={tmp_path / 'run'}"])
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert f"refused {crafted}: {INTERPOLATION_REFUSED}" in output
    assert "Traceback" not in output
    assert victim.read_text() == "precious\n"


def test_a_logger_target_is_recorded_but_never_part_of_what_a_checkpoint_builds(state, tmp_path):
    crafted = craft(with_config(state, lambda c: c["logger"].update(_target_="os.system")), tmp_path / "logger.pt")
    saved = checkpoint.saved_config(load_checkpoint(crafted), crafted)
    assert "logger" not in saved and saved.model._target_ == "vae_lab.model.ConvVAE"


@pytest.mark.parametrize("override", [
    "data.root={_target_:builtins.open,file:VICTIM,mode:w}",
    "data.root='\\${oc.create:{_target_:builtins.open,file:VICTIM,mode:w}}'",
])
def test_the_command_line_cannot_smuggle_a_node_into_the_checked_data_config(trained, victim, tmp_path, override):
    # A node is refused by the trust check (its _target_ is not trusted) before anything else
    # reads it; the escaped one, a string until copied, by the plain-value rule of data_config_here.
    with pytest.raises(ConfigError, match=r"data\.root(=.* is not allowed here: use a plain value| is built by 'builtins.open', "
                                          r"and builtins is not a trusted module)"):
        evaluate(trained, tmp_path / "evaluated", override.replace("VICTIM", str(victim)))
    assert victim.read_text() == "precious\n"


def test_a_config_that_a_checkpoint_could_not_store_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("the config holds an interpolation or resolver ('${oc.env:HOME}') at config.data.root")):
        run_task(compose_config(*SMALL, "data.root=\\${oc.env:HOME}"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.csv").exists()


# ---------------------------------------------------------------------------------------------
# 4. Only regular files are read, and only up to a sane size.

def refused_quickly(path: Path, timeout: float = 20.0) -> str:
    """load_checkpoint(path)'s refusal, from a daemon thread, so a regression fails instead of hanging."""
    outcome = {}

    def load():
        try:
            load_checkpoint(path)
            outcome["error"] = None
        except Exception as error:  # noqa: BLE001 - the test inspects whatever came out
            outcome["error"] = error

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), f"load_checkpoint({path}) still blocks after {timeout} s"
    assert isinstance(outcome["error"], CheckpointError), outcome["error"]
    return str(outcome["error"])


def _fifo(folder: Path) -> Path:
    os.mkfifo(folder / "fifo.pt")
    return folder / "fifo.pt"


def _link(folder: Path, target: Path) -> Path:
    (folder / "link.pt").symlink_to(target)
    return folder / "link.pt"


def _socket(folder: Path) -> Path:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "socket.pt"))
    server.close()  # the socket file stays
    return folder / "socket.pt"


SPECIAL_FILES = [
    ("FIFO", _fifo, "it is a FIFO, not a checkpoint file"),
    ("link to a FIFO", lambda d: _link(d, _fifo(d)), "it is a FIFO (it links to"),
    ("link to /dev/zero", lambda d: _link(d, Path("/dev/zero")), "it is a device (it links to /dev/zero), not a checkpoint file"),
    ("/dev/null", lambda d: Path("/dev/null"), "refused /dev/null: it is a device, not a checkpoint file"),
    ("socket", _socket, "it is a socket, not a checkpoint file"),
]


@pytest.mark.parametrize("name, make, message", SPECIAL_FILES, ids=[case[0] for case in SPECIAL_FILES])
def test_special_files_are_refused_at_once(tmp_path, name, make, message):
    if name == "link to /dev/zero" and not Path("/dev/zero").exists():
        pytest.skip("this machine has no /dev/zero")
    started = time.monotonic()
    assert message in refused_quickly(make(tmp_path))
    assert time.monotonic() - started < 5


def test_a_fifo_given_to_the_evaluate_task_is_refused_without_blocking(tmp_path):
    fifo = _fifo(tmp_path)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(error=_raised(lambda: evaluate(fifo, tmp_path / "run"))), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the evaluate task blocked on a FIFO"
    assert isinstance(outcome["error"], CheckpointError) and "it is a FIFO" in str(outcome["error"])


def _raised(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001
        return error
    return None


def test_a_file_beyond_the_size_bound_is_refused_before_it_is_read(tmp_path):
    huge = tmp_path / "huge.pt"
    with open(huge, "wb") as file:
        file.truncate(MAX_CHECKPOINT_BYTES + 1)  # sparse: no disk space, no time
    assert f"refused {huge}: it is 2.0 GiB, and a vae_lab checkpoint is a few MB" in refused_quickly(huge)


# ---------------------------------------------------------------------------------------------
# 5. A full disk: one message with the epoch and the checkpoint to resume from.

@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB file system (tmpfs, as root); skipped, saying why, where that is not possible."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        reason = f"cannot mount a 2 MiB tmpfs here (needs root): {(result.stderr or result.stdout).strip()}"
        print(reason)
        pytest.skip(reason)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def assert_stopped_at_epoch_1(run: Path, message: str) -> None:
    last = run / "checkpoints" / "last.pt"
    assert f"{last} holds epoch 1; continue with: python run.py task=train train.resume={last} train.epochs=2" in message
    assert load_checkpoint(last)["epoch"] == 1
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()[1:]] == ["1"]


@pytest.mark.slow
def test_a_real_full_disk_is_one_line_naming_the_epoch_and_the_checkpoint_to_resume_from(small_disk):
    run = small_disk / "run"  # last.pt (1.2 MB) fits once, not twice: epoch 2's save fails
    result = run_py(["run.py", *TINY, "data.limit=64", f"hydra.run.dir={run}"])
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert f"cannot write to {run / 'checkpoints' / 'last.pt'} in epoch 2: No space left on device. " in output
    assert "Traceback" not in output and "enforce fail" not in output
    assert_stopped_at_epoch_1(run, output)


def test_a_disk_that_fills_during_a_checkpoint_is_one_line_naming_the_epoch_and_the_checkpoint_to_resume_from(monkeypatch, tmp_path):
    """The fast twin of the tmpfs test above: the file write of epoch 2's last.pt fails part way, as on a full disk."""
    real, saves = vae_lab.files._write_and_rename, []

    def fill_up(path, temporary, content):
        if path.name == "last.pt":
            saves.append(path)
        if len(saves) == 2:
            def half_then_full(file):
                file.write(b"PK\x03\x04 half a file")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(path, temporary, half_then_full)
        return real(path, temporary, content)

    monkeypatch.setattr(vae_lab.files, "_write_and_rename", fill_up)
    run = tmp_path / "run"
    with pytest.raises(VaeLabError) as refused:
        run_task(compose_config("data.limit=64", "train.epochs=2"), run)
    message = str(refused.value)
    assert message.startswith(f"cannot write to {run / 'checkpoints' / 'last.pt'} in epoch 2: No space left on device.")
    assert_stopped_at_epoch_1(run, message)


def test_other_runtime_errors_of_a_save_are_not_disguised_as_a_full_disk(monkeypatch, tmp_path):
    def save(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(RuntimeError, match="a bug"):
        save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# 10. Malformed checkpoints: structure, types, values and sizes checked before anything is built.

def _set(key, value):
    return lambda s: {**s, key: value}


def _without(key):
    return lambda s: {k: v for k, v in s.items() if k != key}


def _config(edit):
    return lambda s: with_config(s, edit)


def _weight(value):
    def edit(s):
        model = dict(s["model"])
        name = next(n for n, t in model.items() if t.is_floating_point())
        model[name] = model[name].clone()
        model[name].view(-1)[0] = value
        return {**s, "model": model, checkpoint.DIGEST_KEY: tensors_digest(model)}  # a consistent digest: the value is the problem
    return edit


def _edit_optimizer_state(s, change):
    optimizer = copy.deepcopy(s["optimizer"])
    optimizer["state"][0]["exp_avg"] = change(optimizer["state"][0]["exp_avg"])
    return {**s, "optimizer": optimizer}


WELL_FORMED = "it is not a well-formed vae_lab checkpoint"
# (id, edit of a good checkpoint, message)
MALFORMED = [
    ("no model", _without("model"), f"{WELL_FORMED} (no model)"),
    ("no history", _without("history"), f"{WELL_FORMED} (no history)"),
    ("epoch as text", _set("epoch", "1"), f"{WELL_FORMED} (epoch is '1', not a whole number >= 0)"),
    ("negative epoch", _set("epoch", -1), f"{WELL_FORMED} (epoch is -1"),
    ("epoch true", _set("epoch", True), f"{WELL_FORMED} (epoch is True"),
    ("model a list", _set("model", [torch.zeros(1)]), f"{WELL_FORMED} (model is not a dict of tensors)"),
    ("model value a list", lambda s: {**s, "model": {**s["model"], "decoder.0.weight": [1.0]}},
     f"{WELL_FORMED} (model['decoder.0.weight'] is a list"),
    ("config a list", _set("config", []), f"{WELL_FORMED} (config is not a dict)"),
    ("config without model group", _config(lambda c: c.pop("model")), f"{WELL_FORMED} (config has no model group)"),
    ("rng without torch state", lambda s: {**s, "rng": {"shuffle": s["rng"]["shuffle"]}}, f"{WELL_FORMED} (rng['torch'] is not"),
    ("history ahead of epoch", lambda s: {**s, "history": s["history"] * 2}, f"{WELL_FORMED} (history holds 2 rows for epoch 1)"),
    ("history row with a foreign column", lambda s: {**s, "history": [{**s["history"][0], "shell": "rm -rf"}]},
     f"{WELL_FORMED} (history is not a list of metrics.csv rows)"),
    # A user's own data set has a name of its own, so any name is accepted; it must be one.
    ("data set that is not a name", _set("data", 42), f"{WELL_FORMED} (data is 42, not the name of a data set)"),
    ("image shape that is not one", _set("image_shape", [1, 28]), f"{WELL_FORMED} (image_shape is [1, 28], not (channels, height, width))"),
    ("digest not a digest", _set(checkpoint.DIGEST_KEY, "abc"), f"{WELL_FORMED} (model_sha256 is not a sha256 digest)"),
    ("NaN weight", _weight(float("nan")), "its weights hold NaN or infinite values (encoder_conv.0.weight)"),
    ("infinite weight", _weight(float("inf")), "its weights hold NaN or infinite values (encoder_conv.0.weight)"),
    ("NaN optimizer moment", lambda s: _edit_optimizer_state(s, lambda v: torch.full_like(v, float("nan"))),
     "its optimizer state holds NaN or infinite values (optimizer state 0.exp_avg)"),
    ("generator state of the wrong size", lambda s: {**s, "rng": {**s["rng"], "shuffle": torch.zeros(7, dtype=torch.uint8)}},
     f"{WELL_FORMED} (rng['shuffle'] is not a random generator state)"),
    ("history value that is not a number", lambda s: {**s, "history": [{**s["history"][0], "test_loss": "low"}]},
     f"{WELL_FORMED} (history is not a list of metrics.csv rows)"),
    ("loss argument its class does not take", _config(lambda c: c["loss"].update(shell="rm -rf")),
     "loss: vae_lab.objectives.ELBO does not accept these settings (got an unexpected keyword argument 'shell')"),
    ("optimizer argument its class does not take", _config(lambda c: c["optim"].update(shell=1)),
     "optim: torch.optim.Adam does not accept these settings"),
    ("weights changed after the digest", lambda s: {**_weight(0.5)(s), checkpoint.DIGEST_KEY: s[checkpoint.DIGEST_KEY]},
     "the file is corrupted (its weights do not match the digest written with them)"),
    ("latent_dim 0 in the saved config", _config(lambda c: c["model"].update(latent_dim=0)),
     "its saved config has a setting vae_lab does not accept: model.latent_dim=0 is not allowed: use a whole number >= 1"),
    ("negative learning rate in the saved config", _config(lambda c: c["optim"].update(lr=-1.0)),
     "its saved config has a setting vae_lab does not accept: optim.lr=-1.0 is not allowed"),
    ("latent_dim 10**9 in the saved config", _config(lambda c: c["model"].update(latent_dim=10**9)),
     # refused by the command line's own size rule (validate), before anything is allocated
     "its saved config has a setting vae_lab does not accept: model (vae_lab.model.ConvVAE) with these settings has 194,000,093,377 parameters"),
    ("base_channels 10**6 in the saved config", _config(lambda c: c["model"].update(base_channels=10**6)),
     "its saved config has a setting vae_lab does not accept: model (vae_lab.model.ConvVAE) with these settings has"),
    ("latent_dim 10**30 in the saved config", _config(lambda c: c["model"].update(latent_dim=10**30)),
     "its saved config has a setting vae_lab does not accept: model (vae_lab.model.ConvVAE) refuses these settings: "
     "empty(): argument 'size' failed to unpack the object at pos 1 with error \"Overflow when unpacking long long. Fix model:"),
    ("missing value in the saved config", _config(lambda c: c["model"].update(hidden_dim="???")),
     "its config holds a missing value ('???') at config.model.hidden_dim"),
    # what torch.load(weights_only=True) reads but a config never holds; nesting is refused before it is walked
    ("config nested 40 deep", _config(lambda c: c["model"].update(extra=functools.reduce(lambda v, _: {"a": v}, range(40), 1))),
     "its config holds nesting deeper than 16 levels at config.model.extra" + ".a" * 15 + ";"),
    ("a config key that is not a string", _config(lambda c: c["model"].update({3: 1})),
     "its config holds a key 3 that is not a string at config.model;"),
    ("a tensor in the config", _config(lambda c: c["model"].update(latent_dim=torch.tensor(2))),
     "its config holds a Tensor at config.model.latent_dim;"),
]


@pytest.mark.parametrize("name, edit, message", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_a_malformed_checkpoint_is_refused_with_what_is_wrong(state, tmp_path, name, edit, message):
    crafted = craft(edit(state), tmp_path / "crafted.pt")
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=re.escape(message)):
        evaluate(crafted, tmp_path / "evaluated")
    assert time.monotonic() - started < 10  # refused before any large allocation or any data is read
    assert not (tmp_path / "evaluated" / "results").exists()


# Resuming also restores the optimizer and the scheduler: states that torch would take, then fail on mid-epoch.
RESUME_ONLY = [
    ("Adam moment of another shape", lambda s: _edit_optimizer_state(s, lambda v: torch.zeros(3)),
     "its optimizer state[0]['exp_avg'] does not fit the optimizer and scheduler its config describes"),
    ("learning rate as text in the optimizer state",
     lambda s: {**s, "optimizer": {**s["optimizer"], "param_groups": [{**s["optimizer"]["param_groups"][0], "lr": "fast"}]}},
     "its optimizer param_groups[0]['lr'] does not fit"),
    ("one parameter group too many",
     lambda s: {**s, "optimizer": {**s["optimizer"], "param_groups": s["optimizer"]["param_groups"] * 2}},
     "its optimizer param_groups does not fit"),
    ("scheduler base_lrs as text", lambda s: {**s, "scheduler": {**s["scheduler"], "base_lrs": "0.1"}},
     "its scheduler state['base_lrs'] does not fit"),
]


@pytest.mark.parametrize("name, edit, message", RESUME_ONLY, ids=[case[0] for case in RESUME_ONLY])
def test_a_training_state_that_does_not_fit_is_refused_before_the_first_step(state, tmp_path, name, edit, message):
    crafted = craft(edit(state), tmp_path / "crafted.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"cannot resume from {crafted}: {message}")):
        run_task(compose_config(*SMALL, f"train.resume={crafted}", "train.epochs=2"), tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "checkpoints").exists() and not (tmp_path / "resumed" / "metrics.csv").exists()


def test_the_digest_is_written_at_save_and_a_file_without_one_still_loads(state, tmp_path):
    written = tmp_path / "written.pt"
    save_checkpoint(state, written)
    assert load_checkpoint(written)[checkpoint.DIGEST_KEY] == tensors_digest(state["model"])
    older = craft({k: v for k, v in state.items() if k != checkpoint.DIGEST_KEY}, tmp_path / "older.pt")
    loaded = load_checkpoint(older)  # written before digests existed
    assert loaded["epoch"] == state["epoch"]
    assert checkpoint.saved_config(loaded, older).model.latent_dim == state["config"]["model"]["latent_dim"]


def test_a_checkpoint_with_a_setting_this_vae_lab_no_longer_reads_still_evaluates(state, tmp_path):
    """The command line refuses a key no one reads (a typo); a checkpoint's saved config may hold one
    that an older vae_lab wrote, and still evaluates."""
    older = copy.deepcopy(state)
    older["config"]["train"]["retired_setting"] = 3
    older["config"]["retired_top_level"] = "x"
    crafted = craft(older, tmp_path / "older.pt")
    outcome = run_task(compose_config(*SMALL, "task=evaluate", f"evaluate.checkpoint={crafted}", "evaluate.iw_samples=2"), tmp_path / "eval")
    assert outcome.headline["test -ELBO"].endswith("nats")
    with pytest.raises(ConfigError, match=r"train.retired_setting is not a setting vae_lab reads"):
        run_task(compose_config(*SMALL, "+train.retired_setting=3"), tmp_path / "typo")


def test_the_digest_covers_names_dtypes_and_shapes_not_only_bytes():
    weights = {"a": torch.arange(4, dtype=torch.float32)}
    assert tensors_digest(weights) != tensors_digest({"b": weights["a"]})
    assert tensors_digest(weights) != tensors_digest({"a": weights["a"].view(torch.int32)})
    assert tensors_digest(weights) != tensors_digest({"a": weights["a"].view(2, 2)})
    assert tensors_digest({"a": weights["a"], "b": weights["a"]}) == tensors_digest({"b": weights["a"], "a": weights["a"]})


def test_random_bit_flips_are_reported_as_damage_never_loaded_changed_nor_as_code(state, tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(state, good)
    original = good.read_bytes()
    with zipfile.ZipFile(good) as archive:
        pickle_record = next(info for info in archive.infolist() if info.filename.endswith("data.pkl"))
    pickle_bytes = range(pickle_record.header_offset, pickle_record.header_offset + 100 + pickle_record.file_size)
    regions = {"anywhere": range(len(original)), "the pickle": pickle_bytes, "the zip directory": range(len(original) - 12000, len(original))}
    rng, flipped, outcomes = random.Random(9), tmp_path / "flipped.pt", set()
    for region in regions.values():
        for _ in range(60):
            damaged = bytearray(original)
            damaged[rng.choice(region)] ^= 1 << rng.randrange(8)
            flipped.write_bytes(bytes(damaged))
            try:
                loaded = load_checkpoint(flipped)
            except CheckpointError as error:
                assert "could run code" not in str(error)
                assert re.search(r"the file is (truncated, )?corrupted", str(error)), str(error)
                outcomes.add("refused")
            else:  # a flip in padding or an unchecked header field: the content read is the content written
                assert tensors_digest(loaded["model"]) == tensors_digest(state["model"])
                assert loaded["epoch"] == state["epoch"] and loaded["config"] == state["config"]
                outcomes.add("identical")
    assert "refused" in outcomes


# ---------------------------------------------------------------------------------------------
# 13. Leftovers of a killed save, and metrics.csv never ahead of last.pt.

KILLED_SAVE = """
import sys, time
from pathlib import Path
import torch
import vae_lab.checkpoint as checkpoint

def half_then_stuck(file):  # half the file written, then the process is killed
    file.write(b"PK\\x03\\x04 half a checkpoint")
    file.flush()
    print("writing", flush=True)
    time.sleep(600)

real_write = checkpoint.write_atomic
checkpoint.write_atomic = lambda path, content: real_write(path, half_then_stuck)  # the real temporary file, lock and all
checkpoint.save_checkpoint({"epoch": 2, "model": {"w": torch.zeros(3)}}, Path(sys.argv[1]))
"""


def age(path: Path, seconds: float = 60) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_a_killed_saves_temporary_file_is_removed_by_the_next_reader_and_a_live_one_is_not(trained, tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    last = folder / "last.pt"
    last.write_bytes((trained / "checkpoints" / "last.pt").read_bytes())
    writer = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(last)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        [temporary] = folder.glob(".last.pt.*.tmp")
        age(temporary)  # only the writer's lock protects it now
        load_checkpoint(last)
        assert temporary.exists(), "the temporary file of a save in progress was removed"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    assert temporary.exists()  # SIGKILL: no cleanup ran
    caplog.set_level(logging.WARNING, logger="vae_lab")
    assert load_checkpoint(last)["epoch"] == 1
    assert not temporary.exists()
    assert f"removed {temporary}, the temporary file of a checkpoint save that was interrupted" in caplog.text


def test_the_evaluate_task_cleans_the_folder_it_reads_and_leaves_other_files_alone(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "STALE_AFTER_SECONDS", 600.0)  # "young" stays young on a busy machine
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes((trained / "checkpoints" / "last.pt").read_bytes())
    stale = run / "checkpoints" / ".last.pt.0123456789ab.tmp"
    young = run / "checkpoints" / ".model_3.pt.ba9876543210.tmp"
    others = [run / "checkpoints" / name for name in (".notes.tmp", "last.pt.tmp", ".last.pt.xyz.tmp")]
    for path in (stale, young, *others):
        path.write_bytes(b"PK")
    for path in (stale, *others):
        age(path, 3600)
    evaluate(run, tmp_path / "evaluated")
    assert not stale.exists()
    assert young.exists()  # may be a save that has not taken its lock yet
    assert all(path.exists() for path in others)
    assert f"removed {stale}" in (tmp_path / "evaluated" / "run.log").read_text()


def test_a_run_killed_during_its_first_save_is_cleaned_when_evaluated(tmp_path):
    stale = tmp_path / "run" / "checkpoints" / ".last.pt.0123456789ab.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"PK")
    age(stale)
    with pytest.raises(CheckpointError, match="is a folder without checkpoints"):
        evaluate(tmp_path / "run", tmp_path / "evaluated")
    assert not stale.exists()


class Killed(BaseException):
    """Stands for SIGKILL at one precise point: nothing after it runs."""


def test_a_kill_between_checkpoint_and_metrics_leaves_metrics_behind_and_resume_reconciles(monkeypatch, tmp_path):
    real = CSVLogger.log_epoch

    def log_epoch(self, row):
        if row["epoch"] == 2:
            raise Killed
        real(self, row)

    monkeypatch.setattr(CSVLogger, "log_epoch", log_epoch)
    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        run_task(compose_config("data.limit=64", "train.epochs=3"), killed)
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["epoch"] == 2
    assert epochs_in(killed / "metrics.csv") == [1]  # behind last.pt, never ahead

    monkeypatch.setattr(CSVLogger, "log_epoch", real)
    resumed = tmp_path / "resumed"
    run_task(compose_config("data.limit=64", "train.epochs=3", f"train.resume={killed / 'checkpoints' / 'last.pt'}"), resumed)
    assert epochs_in(resumed / "metrics.csv") == [1, 2, 3]
    assert [row["epoch"] for row in load_checkpoint(resumed / "checkpoints" / "last.pt")["history"]] == [1, 2, 3]


def test_a_kill_during_the_checkpoint_write_leaves_metrics_at_the_last_saved_epoch(monkeypatch, tmp_path):
    real, calls = checkpoint.torch.save, {"n": 0}

    def save(obj, file, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed
        return real(obj, file, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        run_task(compose_config("data.limit=64", "train.epochs=3"), run)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert epochs_in(run / "metrics.csv") == [1]


def epochs_in(metrics_csv: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in metrics_csv.read_text().splitlines()[1:]]
