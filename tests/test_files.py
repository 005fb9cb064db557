"""Every file vae_lab writes is created inside its folder without following a link (vae_lab.files)."""
import json
import os
import signal

import pytest
from omegaconf import OmegaConf

from vae_lab.errors import sigterm_as_keyboard_interrupt
from vae_lab.files import open_append, write_atomic
from vae_lab.layout import LOCK_FILE
from vae_lab.rundir import RunDirectoryError, claim, leftovers, run_record
from vae_lab.sweep import write_summary


@pytest.fixture
def victim(tmp_path):
    """Another run's file, which a link planted in our folder points to."""
    path = tmp_path / "other_run" / "precious.txt"
    path.parent.mkdir()
    path.write_text("precious\n")
    return path


def test_write_atomic_replaces_a_planted_link_and_never_writes_through_it(tmp_path, victim):
    target = tmp_path / "report.json"
    target.symlink_to(victim)
    write_atomic(target, '{"ok": true}\n')
    assert victim.read_text() == "precious\n"
    assert not target.is_symlink() and json.loads(target.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temporary left


def test_write_atomic_leaves_the_old_file_whole_when_the_writer_fails(tmp_path):
    target = tmp_path / "summary.csv"
    target.write_text("old\n")

    def fails(file):
        file.write(b"half")
        raise RuntimeError("disk vanished")

    with pytest.raises(RuntimeError, match="disk vanished"):
        write_atomic(target, fails)
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_during_a_write_waits_until_the_file_is_whole(tmp_path, number):
    """Raised inside a write, an interrupt would leave no file where SLURM's requeue or a Ctrl-C expects the checkpoint."""
    import torch

    state = {"weights": torch.arange(100_000, dtype=torch.float32)}

    def save(file):
        os.kill(os.getpid(), number)  # as SLURM's requeue or a Ctrl-C, in the middle of the checkpoint
        torch.save(state, file)

    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (nohup and CI may ignore it)
    try:
        with sigterm_as_keyboard_interrupt(), pytest.raises(KeyboardInterrupt) as interrupted:
            handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
            try:
                write_atomic(tmp_path / "last.pt", save)
            finally:
                assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # the handlers are back
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert interrupted.value.args[:1] == ((15,) if number == signal.SIGTERM else ())  # the same interrupt, after the write
    assert torch.equal(torch.load(tmp_path / "last.pt")["weights"], state["weights"])


def test_appending_refuses_a_planted_link(tmp_path, victim):
    target = tmp_path / "metrics.csv"
    target.symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        open_append(target)
    assert victim.read_text() == "precious\n"


def test_the_run_lock_is_never_opened_through_a_link(tmp_path, victim):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).symlink_to(victim)
    with pytest.raises(RunDirectoryError, match="hydra.run.dir=.*lock"):
        claim(folder, "hydra.run.dir")
    assert victim.read_text() == "precious\n"


def test_a_link_at_a_record_name_is_not_a_record(tmp_path, victim):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".hydra").symlink_to(victim.parent, target_is_directory=True)  # Hydra would write config.yaml there
    assert leftovers(folder) == [".hydra"]
    with pytest.raises(RunDirectoryError, match="already holds files"):
        claim(folder, "hydra.run.dir")


@pytest.mark.parametrize("subdir", ["../other_run/.hydra", "/tmp/elsewhere"])
def test_a_record_folder_outside_the_run_is_refused(subdir):
    with pytest.raises(RunDirectoryError, match="hydra.output_subdir=.* leaves the run directory"):
        run_record(OmegaConf.create({"hydra": {"output_subdir": subdir}}))


def test_the_sweep_summary_replaces_a_planted_link(tmp_path, victim):
    sweep = tmp_path / "sweep"
    job = sweep / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- train.alpha=0.1\n")
    for name in ("summary.csv", "summary.md", "summary.png"):
        (sweep / name).symlink_to(victim)
    rows, _ = write_summary(sweep)
    assert victim.read_text() == "precious\n"
    assert len(rows) == 1 and not any((sweep / name).is_symlink() for name in ("summary.csv", "summary.md", "summary.png"))
    assert (sweep / "summary.csv").read_text().startswith("job,status")
    assert os.stat(sweep / "summary.png").st_size > 0
