"""benchmarks/speed.py compares like with like: its hand loop and its pythae peer compute
vae_lab's loss on the reference ConvVAE, so their img/s are rates of the same work."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from vae_lab.runtime import build

from conftest import REPO

# The benchmark harness, not the product: in the full suite only (it builds the reference model and
# the bundled data for each comparison, about 6 s of the fast tier).
pytestmark = pytest.mark.slow

REFERENCE_PARAMETERS = 96_481  # the reference ConvVAE's printout


def load_speed():
    spec = importlib.util.spec_from_file_location("speed", REPO / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def speed():
    return load_speed()


@pytest.fixture
def reference(make_cfg):
    """(model, loss) of the reference config, and a batch of 32 images in [0, 1]."""
    torch.manual_seed(0)
    cfg = make_cfg()
    images = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    return build(cfg.model), build(cfg.loss), images


def twin(model):
    copy = type(model)(latent_dim=model.latent_dim)
    copy.load_state_dict(model.state_dict())
    return copy


def test_hand_loop_evaluates_vae_labs_loss(speed, reference):
    model, loss_fn, x = reference
    model.eval()
    torch.manual_seed(7)  # both draw z with randn_like from the global generator
    hand = speed.hand_eval_epoch(model, [x], loss_fn.alpha) / len(x)
    torch.manual_seed(7)
    with torch.no_grad():
        framework = loss_fn(model, x).total.item()
    assert hand == pytest.approx(framework, rel=1e-5)


def test_hand_loop_trains_on_vae_labs_loss_and_gradients(speed, reference):
    model, loss_fn, x = reference
    hand_model = twin(model)
    torch.manual_seed(7)
    framework = loss_fn(model.train(), x).total
    framework.backward()
    torch.manual_seed(7)
    # lr = 0: the step leaves the weights alone, so the gradients it computed can be compared.
    hand = speed.hand_train_epoch(hand_model, torch.optim.SGD(hand_model.parameters(), lr=0.0), [x], loss_fn.alpha)
    assert hand / len(x) == pytest.approx(framework.item(), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), hand_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_without_pythae_the_benchmark_says_d_is_skipped_and_how_to_install(speed, monkeypatch):
    monkeypatch.setitem(sys.modules, "pythae", None)  # makes `import pythae` fail
    peer, note = speed.load_pythae(unwanted=False)
    assert peer is None
    assert "skipped" in note and "pip install -e '.[bench]'" in note


@pytest.fixture(scope="module")
def peer(speed):
    try:
        import pythae  # noqa: F401
    except ImportError as error:
        pytest.skip(f"pythae is not installed ({error}); the bench extra brings it: pip install -e '.[bench]'")
    return speed.load_sibling("pythae_peer")


def test_pythae_adapter_is_the_reference_architecture(peer, reference):
    model, loss_fn, _ = reference
    wrapped = peer.pythae_vae(model, loss_fn.alpha)
    assert sum(p.numel() for p in wrapped.parameters()) == REFERENCE_PARAMETERS
    assert {id(p) for p in wrapped.parameters()} == {id(p) for p in model.parameters()}  # the same layers


def test_pythae_adapter_computes_vae_labs_loss(peer, reference):
    model, loss_fn, x = reference
    wrapped = peer.pythae_vae(twin(model), loss_fn.alpha)
    model.eval(), wrapped.eval()
    with torch.no_grad():
        torch.manual_seed(7)
        pythae_loss = wrapped({"data": x}).loss.item()
        torch.manual_seed(7)
        framework = loss_fn(model, x).total.item()
    assert pythae_loss == pytest.approx(framework, rel=1e-5)


def test_pythae_trainer_starts_from_the_state_it_was_given(peer, reference, tmp_path):
    # Its construction runs a training-mode forward pass that moves BatchNorm's running statistics.
    model, loss_fn, x = reference
    wrapped = peer.pythae_vae(model, loss_fn.alpha)
    initial = {k: v.clone() for k, v in wrapped.state_dict().items()}
    peer.pythae_trainer(wrapped, x, x, batch_size=16, eval_batch_size=32, lr=1e-3, device=torch.device("cpu"),
                        output_dir=tmp_path)
    for key, tensor in wrapped.state_dict().items():
        assert torch.equal(tensor, initial[key]), key


def test_the_speed_table_runs_on_colour_data_with_the_hand_loop_on_the_same_uint8_images(tmp_path):
    import subprocess

    out = tmp_path / "speed.md"
    result = subprocess.run([sys.executable, "benchmarks/speed.py", "--data-root", str(tmp_path), "--device", "cpu", "--no-pythae",
                             "--repeats", "1", "--limit", "128", "--iw-images", "16", "--out", str(out),
                             "data=shapes", "data.image_size=20", "threads=1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    table = out.read_text()
    assert "| training epoch | 128 |" in table and "(b) hand loop" in table and "(c)" not in table  # (c) is MNIST's DataLoader
    values = [line for line in table.splitlines() if line.startswith("| ELBO pass (test) |")][-1].split("|")[2:4]
    assert float(values[0]) == pytest.approx(float(values[1]), rel=1e-4)  # the same loss from the same weights
