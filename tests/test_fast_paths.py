"""The GPU fast paths (bf16 autocast, torch.compile, channels_last, fused Adam) are checked for
correctness on the CPU: each trains to the losses of the plain path."""
import pytest

from conftest import read_metrics
from vae_lab.cli import run_task

SMALL = ["train.epochs=1", "data.limit=128"]


def losses(run_dir):
    row = read_metrics(run_dir)[-1]
    return float(row["train_loss"]), float(row["test_loss"])


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    from conftest import shared_run

    return losses(shared_run(tmp_path_factory, *SMALL))


@pytest.mark.parametrize("option, tolerance", [
    ("train.amp=true", 1e-2),          # bfloat16 keeps 8 bits of mantissa
    ("train.channels_last=true", 1e-3),
    ("optim.fused=true", 1e-3),
    pytest.param("train.compile=aot_eager", 1e-3, marks=pytest.mark.slow),  # dynamo capture + AOT autograd, without a C++ build
])
def test_fast_path_trains_to_the_plain_losses(make_cfg, tmp_path, plain, option, tolerance):
    run_task(make_cfg(*SMALL, option), tmp_path)
    assert losses(tmp_path) == pytest.approx(plain, rel=tolerance)
