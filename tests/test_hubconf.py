"""hubconf.py: torch.hub.load(<checkout>, ..., source="local") gives the shipped models, ready for certify."""

import json
from pathlib import Path

import pytest
import torch

import bagcert

REPO = Path(__file__).resolve().parents[1]


def test_hub_list_names_the_two_shipped_models(monkeypatch):
    # torch.hub.list only reads GitHub repositories; point its download step at this checkout instead
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda *args, **kwargs: str(REPO))
    assert sorted(torch.hub.list("owner/bagcert")) == ["bagcert_cifar10", "bagcert_imagenette"]


@pytest.mark.parametrize(
    "entry, filename, size, num_classes",
    [
        ("bagcert_cifar10", "bagcert_cifar10_r5s2_dm.pt", 32, 10),
        ("bagcert_imagenette", "bagcert_imagenette_r17s8.pt", 128, 10),
    ],
)
def test_hub_load_local_returns_the_shipped_model_in_eval_mode(entry, filename, size, num_classes):
    torch.set_num_threads(1)
    model = torch.hub.load(str(REPO), entry, source="local")
    assert isinstance(model, bagcert.BagModel)
    assert not model.training
    reference, metadata = bagcert.load_checkpoint(REPO / "checkpoints" / filename)
    assert model.metadata == metadata
    assert len(model.metadata["classes"]) == num_classes
    ref_state = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    res = bagcert.certify(model, x, torch.tensor([0, 1]), patch_size=5)  # refuses a model in training mode
    expected = bagcert.certify(reference, x, torch.tensor([0, 1]), patch_size=5)
    assert torch.equal(res.prediction, expected.prediction)
    assert torch.equal(res.certified, expected.certified)


def _report_numbers(folder, size):
    """Clean and certified accuracy (%, two decimals) of a shipped report, as the docs quote them."""
    doc = json.loads((REPO / "checkpoints" / folder / "report" / "results.json").read_text())
    return f"{100 * doc['clean_accuracy']:.2f}", f"{100 * doc['certified_accuracy'][size]:.2f}"


def test_hub_entry_points_document_classes_input_and_numbers():
    # the docstring torch.hub.help shows (help() itself reads GitHub repositories only); the numbers are the
    # shipped reports' on the full test set
    cifar = _report_numbers("bagcert_cifar10_r5s2_dm", "5")  # its default certificate, double masking
    assert cifar == ("66.42", "44.29")
    for entry, numbers in (("bagcert_cifar10", cifar), ("bagcert_imagenette", ("73.14", "39.12"))):
        module = torch.hub._import_module("hubconf", str(REPO / "hubconf.py"))
        doc = getattr(module, entry).__doc__
        assert "classes" in doc and "input" in doc
        for number in numbers:
            assert number in doc


def test_hub_load_refuses_untrained_weights():
    with pytest.raises(ValueError, match="pretrained=True"):
        torch.hub.load(str(REPO), "bagcert_cifar10", source="local", pretrained=False)
