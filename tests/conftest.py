import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def load_benchmark(name):
    """Import benchmarks/<name>.py (not a package) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

# keep the suite predictable on small machines; tests measure properties, never speed
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Dataset caches go to a per-session temporary folder, not the user's home."""
    monkeypatch.setenv("BAGCERT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def one_thread():
    """One torch thread for the test (documentation examples run as a user would paste them), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    import bagcert

    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5", num_classes=10, width=8).eval()
    path = tmp_path / "tiny.pt"
    bagcert.save_checkpoint(path, model, input_size=32, classes=[f"class{i}" for i in range(10)], note="test")
    return path
