"""How fast is vae_lab? Its epoch against (b) a minimal PyTorch loop, (c) the reference's style and (d) pythae.

In one process, on the same data, model (the reference ConvVAE) and batch size:
  (a) the framework: its engine and device-resident data, built by train.build_training
      exactly as `python run.py` builds them (config overrides apply: train.amp=true, ...);
  (b) the floor: a hand-written loop over the same tensors on the device;
  (c) the reference project's style: torchvision MNIST with ToTensor through a DataLoader;
  (d) the library a user might pick instead: pythae's BaseTrainer on the same ConvVAE layers
      (benchmarks/pythae_peer.py; optional, from the `bench` extra: skipped, with the reason,
      when pythae cannot be imported).
Each is timed over whole epochs, interleaved, and the median is kept. The evaluation passes
(the ELBO over the test set, the importance-weighted bound at k = 100) run first, while all
four copies still hold the same initial weights, so what each reports is printed beside it.

  python benchmarks/speed.py --data-root ../shared/data                  # CPU or GPU, as found
  python benchmarks/speed.py --data-root ../shared/data --out benchmarks/results/cpu.md
  python benchmarks/speed.py --data-root ../shared/data train.amp=true train.compile=true optim.fused=true
  python benchmarks/speed.py --data-root ../shared/data --profile          # where a training step's time goes
  python benchmarks/speed.py --data-root ../shared/data --iw-only 5000 --iw-images 1000   # bounded-memory IW
"""
from __future__ import annotations

import argparse
from copy import deepcopy
import math
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vae_lab.cli import CONFIG_DIR  # noqa: E402
from vae_lab.data import as_float  # noqa: E402
from vae_lab.engine import run_epoch  # noqa: E402
from vae_lab.metrics import importance_weighted_nll  # noqa: E402
from vae_lab.runtime import resolve_device, seed_everything  # noqa: E402
from vae_lab.train import build_training  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder holding MNIST/raw")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per variant (median kept)")
    parser.add_argument("--limit", type=int, default=None, help="images per split (default: all)")
    parser.add_argument("--iw-images", type=int, default=2000, help="test images for the IW timing")
    parser.add_argument("--iw-only", type=int, metavar="K", help="only time the framework's IW bound with K samples")
    parser.add_argument("--profile", action="store_true", help="only break a training step into its parts")
    parser.add_argument("--torch-profile", type=Path, metavar="TRACE",
                        help="only profile (a)'s training steps with torch.profiler: top operators, Chrome trace to TRACE")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for (c)")
    parser.add_argument("--no-pythae", action="store_true", help="leave out (d) even when pythae is installed")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for (a), e.g. train.amp=true")
    args = parser.parse_args()

    device = resolve_device(args.device)
    cfg = compose_config(args, device)
    seed_everything(cfg.seed)
    framework = build_training(cfg, device)
    if args.iw_only:
        return iw_only(framework, args, device)
    if args.profile:
        return print(profile_steps(framework, cfg, device))
    if args.torch_profile:
        return print(torch_profile(framework, cfg, device, args.torch_profile))

    data, batch = framework.data, cfg.train.batch_size
    hand_model, hand_optimizer = fresh_copy(framework.model, cfg)
    loader_model, loader_optimizer = fresh_copy(framework.model, cfg)
    # (c) reads MNIST through torchvision's DataLoader: only when the data are MNIST
    loader = data.name == "mnist"
    train_loader, test_loader = reference_loaders(args, batch, cfg.evaluate.batch_size) if loader else (None, None)
    alpha = framework.objective.alpha
    shuffle = torch.Generator().manual_seed(0)
    peer, peer_note = load_pythae(args.no_pythae)

    train = {
        "a": lambda: run_epoch(framework.model, framework.step, data.train_images, batch,
                               optimizer=framework.optimizer, generator=shuffle),
        "b": lambda: hand_train_epoch(hand_model, hand_optimizer, batches_on_device(data.train_images, batch, shuffle), alpha),
        "c": lambda: hand_train_epoch(loader_model, loader_optimizer, batches_from_loader(train_loader, device), alpha),
    }
    n_test = len(data.test_images)
    test = {  # each returns the mean loss per test image
        "a": lambda: run_epoch(framework.model, framework.step, data.test_images, cfg.evaluate.batch_size)["loss"],
        "b": lambda: hand_eval_epoch(hand_model, batches_on_device(data.test_images, cfg.evaluate.batch_size, None), alpha) / n_test,
        "c": lambda: hand_eval_epoch(loader_model, batches_from_loader(test_loader, device), alpha) / n_test,
    }
    iw_images = data.test_images[: args.iw_images]
    iw = {
        "a": lambda: importance_weighted_nll(framework.model, iw_images, 100, batch_size=cfg.evaluate.batch_size),
        "b": lambda: hand_iw(hand_model, batches_on_device(iw_images, cfg.evaluate.batch_size, None), 100),
        "c": lambda: hand_iw(loader_model, batches_from_loader(iw_loader(test_loader, args.iw_images), device), 100),
    }
    if not loader:
        for variants in (train, test, iw):
            del variants["c"]
    with tempfile.TemporaryDirectory(prefix="speed-pythae-") as peer_dir:
        if peer is not None:
            peer_model = peer.pythae_vae(fresh_copy(framework.model, cfg)[0], alpha)
            trainer = peer.pythae_trainer(
                peer_model, data.train_images, data.test_images, batch_size=batch,
                eval_batch_size=cfg.evaluate.batch_size, lr=cfg.optim.lr, device=device, output_dir=peer_dir)
            train["d"] = lambda: peer.train_epoch(trainer)
            test["d"] = lambda: peer.evaluation_pass(trainer)
            iw["d"] = lambda: peer.importance_weighted_nll(peer_model, as_float(iw_images), 100)
        # Evaluation first: the four copies still hold the same weights, so their values compare.
        rows = [
            ("ELBO pass (test)", n_test, *time_variants(test, args.repeats, device)),
            ("IW bound, k = 100", len(iw_images), *time_variants(iw, 1, device)),
            ("training epoch", len(data.train_images), *time_variants(train, args.repeats, device)),
        ]
    table = markdown(rows, describe(device, cfg, args, peer_note))
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


def load_pythae(unwanted: bool):
    """(the pythae_peer module, a note for the table); the module is None when (d) is skipped."""
    if unwanted:
        return None, "(d) pythae: skipped (--no-pythae)."
    try:
        import pythae

        pythae_peer = load_sibling("pythae_peer")
    except Exception as error:  # ImportError, or a pythae release that no longer imports with these deps
        note = (f"(d) pythae: skipped, it cannot be imported ({type(error).__name__}: {error}); "
                "install it with pip install -e '.[bench]'.")
        print(note, file=sys.stderr)
        return None, note
    return pythae_peer, f"(d) pythae {pythae_version(pythae)}: BetaVAE (beta = train.alpha) with its BaseTrainer, fp32."


def load_sibling(name: str):
    """benchmarks/<name>.py as a module, whether this file runs as a script or is imported by a test."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pythae_version(pythae) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pythae")
    except PackageNotFoundError:
        return getattr(pythae, "__version__", "(version unknown)")


def compose_config(args, device):
    # MNIST from --data-root unless the overrides choose another data set (e.g. data=shapes)
    mnist = [] if any(o.startswith("data=") for o in args.overrides) else [
        f"data.root={args.data_root}", "data.download=false", "data.fallback=false"]
    overrides = [f"device={device}", *mnist, f"data.limit={args.limit if args.limit else 'null'}", *args.overrides]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def fresh_copy(model, cfg):
    """The same architecture and initial weights, with its own Adam, for (b) and (c)."""
    copy = deepcopy(model)  # any data shape: the model as built for the data
    return copy, torch.optim.Adam(copy.parameters(), lr=cfg.optim.lr)


# (b) and (c): the loop a researcher writes by hand, in the style of pytorch/examples' vae.
def hand_train_epoch(model, optimizer, batches, alpha: float) -> float:
    model.train()
    total = torch.zeros((), device=next(model.parameters()).device)
    for x in batches:
        reconstruction, mu, logvar = model(x)
        bce = F.binary_cross_entropy(reconstruction, x, reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        loss = (bce + alpha * kld) / len(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(x)
    return total.item()


@torch.no_grad()
def hand_eval_epoch(model, batches, alpha: float) -> float:
    model.eval()
    total = 0.0
    for x in batches:
        reconstruction, mu, logvar = model(x)
        bce = F.binary_cross_entropy(reconstruction, x, reduction="sum")
        total += (bce - alpha * 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())).item()
    return total


@torch.no_grad()
def hand_iw(model, batches, k: int) -> float:
    """The IW bound written plainly: k decodings of the batch, one sample at a time."""
    model.eval()
    total, count = 0.0, 0
    for x in batches:
        mu, logvar = model.encode(x)
        std = torch.exp(0.5 * logvar)
        log_w = []
        for _ in range(k):
            z = mu + std * torch.randn_like(std)
            log_px = -F.binary_cross_entropy(model.decoder(z), x, reduction="none").flatten(1).sum(1)
            log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(1)
            log_qz = -0.5 * (((z - mu) / std).pow(2) + logvar + math.log(2 * math.pi)).sum(1)
            log_w.append(log_px + log_pz - log_qz)
        total += (math.log(k) - torch.logsumexp(torch.stack(log_w), 0)).sum().item()
        count += len(x)
    return total / count


def batches_on_device(images, batch_size: int, generator):
    order = torch.randperm(len(images), generator=generator) if generator is not None else torch.arange(len(images))
    order = order.to(images.device)
    return (as_float(images[index]) for index in order.split(batch_size))


def batches_from_loader(loader, device):
    return (x.to(device, non_blocking=True) for x, _ in loader)


def reference_loaders(args, train_batch: int, test_batch: int):
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import MNIST
    from torchvision.transforms import ToTensor

    pin = torch.cuda.is_available()
    sets = [MNIST(args.data_root, train=train, transform=ToTensor()) for train in (True, False)]
    if args.limit:
        sets = [Subset(s, range(min(args.limit, len(s)))) for s in sets]
    return (DataLoader(sets[0], batch_size=train_batch, shuffle=True, num_workers=args.workers, pin_memory=pin),
            DataLoader(sets[1], batch_size=test_batch, shuffle=False, num_workers=args.workers, pin_memory=pin))


def iw_loader(test_loader, count: int):
    from torch.utils.data import DataLoader, Subset

    return DataLoader(Subset(test_loader.dataset, range(count)), batch_size=test_loader.batch_size)


def time_variants(variants: dict, repeats: int, device) -> tuple[dict, dict]:
    """(median seconds, value of the warm-up call) of each variant; one untimed warm-up call each,
    then interleaved repeats."""
    values = {name: run() for name, run in variants.items()}
    seconds = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            synchronize(device)
            started = time.perf_counter()
            run()
            synchronize(device)
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(times) for name, times in seconds.items()}, values


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


VARIANT_NAMES = {"a": "vae_lab", "b": "hand loop", "c": "DataLoader", "d": "pythae"}


def markdown(rows, header: str) -> str:
    """The img/s table, then what each evaluation pass reported (per image, same initial weights)."""
    names = [name for name in VARIANT_NAMES if name in rows[0][2]]
    others = names[1:]
    lines = [header, "",
             "| pass | images | " + " | ".join(f"({n}) {VARIANT_NAMES[n]} img/s" for n in names)
             + " | " + " | ".join(f"a/{n}" for n in others) + " |",
             "|---|---:|" + "---:|" * (len(names) + len(others))]
    for name, images, seconds, _values in rows:
        rate = {k: images / v for k, v in seconds.items()}
        lines.append(f"| {name} | {images:,} | " + " | ".join(f"{rate[n]:,.0f}" for n in names)
                     + " | " + " | ".join(f"{rate['a'] / rate[n]:.2f}" for n in others) + " |")
    lines += ["", "What each evaluation pass reported, per image in nats, from the same initial weights "
              "(the -ELBO with the KL weighted by train.alpha; the IW bound on -log p(x)):", "",
              "| pass | " + " | ".join(f"({n}) {VARIANT_NAMES[n]}" for n in names) + " |",
              "|---|" + "---:|" * len(names)]
    for name, _images, _seconds, values in rows:
        if name != "training epoch":
            lines.append(f"| {name} | " + " | ".join(f"{values[n]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def describe(device, cfg, args, peer_note: str) -> str:
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    options = " ".join(args.overrides) or "defaults"
    return (f"Machine: {machine}; torch {torch.__version__}; batch {cfg.train.batch_size} "
            f"(test {cfg.evaluate.batch_size}); (a) with {options}; median of {args.repeats} epochs "
            f"(IW: 1 run on {args.iw_images:,} test images). {peer_note}")


def profile_steps(framework, cfg, device, steps: int = 60) -> str:
    """Mean milliseconds per training step in each phase, with the device synchronised between phases."""
    model, objective, optimizer = framework.model, framework.objective, framework.optimizer
    images, batch = framework.data.train_images, cfg.train.batch_size
    model.train()
    phases = {"data (index, gather)": 0.0, "forward + loss": 0.0, "backward": 0.0, "optimizer step": 0.0, "bookkeeping": 0.0}
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    order = torch.randperm(len(images)).to(device)
    for step in range(steps + 10):
        marks = [time.perf_counter()]

        def mark():
            synchronize(device)
            marks.append(time.perf_counter())

        x = as_float(images[order[(step * batch) % (len(images) - batch):][:batch]])
        mark()
        terms = objective(model, x)
        mark()
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        mark()
        optimizer.step()
        mark()
        sums += torch.stack([t.detach().double() for t in terms]) * len(x)
        sums[0].item()
        mark()
        if step >= 10:  # after warm-up
            for name, start, end in zip(phases, marks, marks[1:]):
                phases[name] += (end - start) / steps
    total = sum(phases.values())
    lines = [f"Per training step (batch {batch}, {device}, mean of {steps} steps):", "",
             "| phase | ms | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {seconds * 1000:.2f} | {seconds / total:.1%} |" for name, seconds in phases.items()]
    lines.append(f"| total | {total * 1000:.2f} | 100% |")
    return "\n".join(lines)


def torch_profile(framework, cfg, device, trace: Path, steps: int = 100) -> str:
    """`steps` training steps of (a), as run_epoch runs them, under torch.profiler after a warm-up pass.

    Prints the operators that take the most (device, else CPU) time and how busy the device
    was; the Chrome trace (chrome://tracing, Perfetto) shows the gaps between kernels.
    """
    from torch.profiler import ProfilerActivity, profile

    batch = cfg.train.batch_size
    images = framework.data.train_images[: steps * batch]
    steps = math.ceil(len(images) / batch)  # fewer when the split is smaller

    def epoch():
        run_epoch(framework.model, framework.step, images, batch, optimizer=framework.optimizer)
        synchronize(device)

    epoch()  # compilation, cuDNN's kernel choice, the caching allocator
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as profiler:
        started = time.perf_counter()
        epoch()
        seconds = time.perf_counter() - started
    trace.parent.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(trace))
    averages = profiler.key_averages()
    lines = [f"torch.profiler, {steps} training steps of batch {batch} on {device} after a warm-up pass: "
             f"{seconds * 1000 / steps:.2f} ms per step ({len(images) / seconds:,.0f} img/s with the profiler on)."]
    if cuda:
        busy = sum(event.self_device_time_total for event in averages) / 1e6  # microseconds -> seconds
        lines.append(f"Device busy {busy * 1000 / steps:.2f} ms per step ({busy / seconds:.0%} of the wall time); "
                     "the rest is the host launching work or waiting.")
    lines += ["", averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=25),
              f"Chrome trace: {trace}"]
    return "\n".join(lines)


def iw_only(framework, args, device) -> None:
    images = framework.data.test_images[: args.iw_images]
    before = peak_memory(device)
    started = time.perf_counter()
    nll = importance_weighted_nll(framework.model, images, args.iw_only, batch_size=256)
    seconds = time.perf_counter() - started
    print(f"IW bound, k = {args.iw_only}, {len(images):,} test images on {device}: {seconds:.1f} s "
          f"({len(images) * args.iw_only / seconds:,.0f} decodings/s); -log p(x) <= {nll:.3f} (untrained model); "
          f"peak memory {peak_memory(device) / 2**20:,.0f} MiB (before the bound: {before / 2**20:,.0f} MiB)")


def peak_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


if __name__ == "__main__":
    main()
