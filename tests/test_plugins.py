"""Models of the user's own: a --model-module file trained, saved and certified through the CLI; entry-point
plugins found through an installed package's metadata; the one-line errors (docs/own_model_plugin.md)."""

import json
import re
import shlex
import sys
import textwrap

import pytest
import torch
from torch import nn

import bagcert
import bagcert.models as models
import bagcert.models.plugins as plugins
from bagcert.cli import certify, train
from conftest import ROOT

DOC = ROOT / "docs" / "own_model_plugin.md"


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry and a fresh plugin state: what a test registers is gone after it."""
    base = dict(models._REGISTRY)
    monkeypatch.setattr(models, "_REGISTRY", dict(base))
    monkeypatch.setattr(plugins, "_STATE", {"loaded": None, "error": None})
    return base


def _doc_blocks(kind: str) -> list:
    return re.findall(rf"^```{kind}[ \t]*\n(.*?)^```", DOC.read_text(encoding="utf-8"), re.S | re.M)


def _doc_commands() -> list:
    """The bash block of section 2: the train and certify commands, continuation lines joined, as argv lists."""
    block = next(b for b in _doc_blocks("bash") if "--model-module my_models.py" in b)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_doc_model_file_trains_saves_and_certifies_through_the_cli(registry, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples").symlink_to(ROOT / "samples")
    model_file = next(b for b in _doc_blocks("python") if b.startswith('"""my_models.py'))
    (tmp_path / "my_models.py").write_text(model_file)
    (train_cmd, certify_cmd) = _doc_commands()
    assert train_cmd[:2] == ["bagcert", "train"] and certify_cmd[:2] == ["bagcert", "certify"]

    # the documented commands as written, plus a smaller run (2 steps of 16 images, float32, width 8) for a fast suite
    assert train.main(train_cmd[2:] + ["--no-progress", "--max-steps", "2", "--batch-size", "16", "--no-amp",
                                       "--model-kwargs", '{"width": 8}']) == 0
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 2
    config = json.loads((tmp_path / "runs/small/config.json").read_text())
    assert config["model"] == "small_bagnet5" and config["model_modules"] == ["my_models.py"]
    raw = torch.load(tmp_path / "runs/small/model.pt", weights_only=True)
    assert raw["model"] == {"name": "small_bagnet5", "kwargs": {"width": 8, "num_classes": 10}}

    assert certify.main(certify_cmd[2:] + ["--no-progress"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["num_images"] == 40 and set(line["certified_accuracy"]) == {"1", "3", "5"}
    report = json.loads((tmp_path / "runs/small/report/results.json").read_text())
    assert report["checkpoint"]["model"] == "small_bagnet5"

    # the report's numbers are the library's numbers for the rebuilt model on the same 40 held-out images
    python_block = next(b for b in _doc_blocks("python") if "load_model_module" in b)
    namespace = {}
    exec(python_block, namespace)
    model, meta = namespace["model"], namespace["meta"]
    assert type(model).__name__ == "SmallBagNet" and not model.training
    from bagcert.data import load_checkpoint_split

    data = load_checkpoint_split("samples/cifar10/test", "test", meta["split"], size=32, num_classes=10)
    res = bagcert.certify(model, data.float_images(), data.labels, patch_sizes=[1, 3, 5])
    for size in (1, 3, 5):
        assert report["certified_count"][str(size)] == int(res[size].certified_correct.sum())

    # the same file in a process that has not imported it: one line saying what is missing and how to provide it
    monkeypatch.setattr(models, "_REGISTRY", dict(registry))
    with pytest.raises(SystemExit) as exc:
        certify.main(["--checkpoint", "runs/small/model.pt", "--dataset", "samples/cifar10/test", "--output", "r2", "--no-progress"])
    text = exc.value.code
    assert isinstance(text, str) and "\n" not in text
    assert "unknown model 'small_bagnet5'" in text and "--model-module FILE_OR_MODULE" in text
    assert "it was trained with --model-module my_models.py" in text and "entry point group bagcert.models" in text
    with pytest.raises(bagcert.CheckpointError, match="unknown model 'small_bagnet5'"):
        bagcert.load_checkpoint("runs/small/model.pt")


def _write_module(folder, name, body):
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


MODEL_CODE = """
    from torch import nn
    import bagcert

    class {cls}(bagcert.BagModel):
        def __init__(self, num_classes=10, width=4):
            super().__init__(num_classes, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
            self.conv = nn.Conv2d(3, width, 3, stride=2)
            self.head = nn.Conv2d(width, num_classes, 1)
            self.geometry = bagcert.Geometry.from_layers([(3, 2, 0), (1, 1, 0)])

        def features_to_logits(self, x):
            return self.head(self.conv(x).relu())
"""


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """``make(dist, entry_points, modules)``: an installed distribution made of a ``*.dist-info`` folder (METADATA,
    entry_points.txt) and module files in a folder put on ``sys.path``, as pip would install it."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    names = []

    def make(dist, entry_points: dict, modules: dict):
        info = site / f"{dist}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\n{lines}")
        for name, body in modules.items():
            _write_module(site, name, body)
            names.append(name)

    yield make
    for name in names:
        sys.modules.pop(name, None)


def test_entry_point_plugins_load_lazily_and_their_checkpoints_round_trip(registry, fake_distribution, tmp_path, monkeypatch):
    fake_distribution("fakeplug", {"fake_fn": "fakeplug_models:register", "fake_mod": "fakeplug_more"}, {
        "fakeplug_models": MODEL_CODE.format(cls="FakeNet") + """
    def register():
        bagcert.register_model("fake_net", FakeNet, "a plugin model", width=4)
""",
        "fakeplug_more": MODEL_CODE.format(cls="FakeNet2") + """
    bagcert.register_model("fake_net2", FakeNet2, "registered on import")
""",
    })
    # bagcert's own models never load plugins
    bagcert.create_model("cifar_bagnet5", num_classes=10, width=8)
    assert plugins._STATE["loaded"] is None and "fake_net" not in models._REGISTRY
    # a name not found loads them: the function is called, the module imported
    model = bagcert.create_model("fake_net", num_classes=3).eval()
    assert plugins._STATE["loaded"] == ["fake_fn", "fake_mod"]
    assert {"fake_net", "fake_net2"} <= set(bagcert.list_models("fake"))
    assert model.config == {"name": "fake_net", "kwargs": {"width": 4, "num_classes": 3}}

    path = bagcert.save_checkpoint(tmp_path / "fake.pt", model, input_size=16)
    x = torch.rand(2, 3, 16, 16)
    expected = model.local_logits(x)
    # a fresh process: nothing registered from the plugin yet; loading the checkpoint finds it by its name
    monkeypatch.setattr(models, "_REGISTRY", dict(registry))
    monkeypatch.setattr(plugins, "_STATE", {"loaded": None, "error": None})
    sys.modules.pop("fakeplug_models", None)
    loaded, meta = bagcert.load_checkpoint(path)
    assert type(loaded).__name__ == "FakeNet" and meta["input_size"] == 16
    assert torch.equal(loaded.local_logits(x), expected)


def test_a_broken_plugin_is_one_line_naming_it(registry, fake_distribution, tiny_checkpoint, tmp_path):
    fake_distribution("fakebroken", {"broken": "fakebroken_models"}, {
        "fakebroken_models": "import bagcert\nimport fakebroken_missing_dependency\n",
    })
    with pytest.raises(models.PluginError) as exc:
        bagcert.list_models()
    text = str(exc.value)
    assert "\n" not in text and "model plugin 'broken'" in text and "fakebroken 0.1" in text
    assert "ModuleNotFoundError: No module named 'fakebroken_missing_dependency' (fakebroken_models.py, line 2)" in text
    with pytest.raises(models.PluginError, match="model plugin 'broken'"):  # every later lookup says the same
        bagcert.create_model("no_such_model")
    assert bagcert.create_model("cifar_bagnet5", num_classes=10, width=8).config["name"] == "cifar_bagnet5"

    # a checkpoint of a model bagcert does not have: the CLI's one line names the broken plugin
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["model"]["name"] = "plugin_net"
    torch.save(raw, tmp_path / "plugin.pt")
    with pytest.raises(SystemExit) as exc:
        certify.main(["--checkpoint", str(tmp_path / "plugin.pt"), "--dataset", "synthetic:8", "--output", str(tmp_path / "o")])
    assert "\n" not in exc.value.code and "records model 'plugin_net'" in exc.value.code and "model plugin 'broken'" in exc.value.code


def test_a_plugin_function_must_register_and_return_none(registry, fake_distribution):
    fake_distribution("fakefactory", {"oops": "fakefactory_models:FakeNet3"}, {"fakefactory_models": MODEL_CODE.format(cls="FakeNet3")})
    with pytest.raises(models.PluginError, match="model plugin 'oops'.* returned a FakeNet3; the object of a bagcert.models "
                       "entry point is a module or a function that calls bagcert.register_model"):
        bagcert.list_models()


class _DuckModel(nn.Module):
    """Not a BagModel, but with everything certification reads: local_logits, geometry, num_classes."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, num_classes, 3)
        self.geometry = bagcert.Geometry.from_layers([(3, 1, 0)])

    def local_logits(self, x):
        return self.conv(x)


class _NoGeometry(bagcert.BagModel):
    def __init__(self, num_classes=10):
        super().__init__(num_classes, mean=(0.5,) * 3, std=(0.5,) * 3)
        self.conv = nn.Conv2d(3, num_classes, 3)

    def features_to_logits(self, x):
        return self.conv(x)


def test_factories_that_return_no_bagcert_model_are_refused(registry, tmp_path, capsys):
    bagcert.register_model("lin", lambda num_classes=10: nn.Linear(3, num_classes))
    bagcert.register_model("plain", lambda num_classes=10: "a string")
    bagcert.register_model("no_geometry", _NoGeometry)
    bagcert.register_model("duck", _DuckModel)
    with pytest.raises(TypeError, match="model 'lin': its factory <lambda> returned a Linear without local_logits; expected "
                       "a bagcert.BagModel subclass"):
        bagcert.create_model("lin")
    with pytest.raises(TypeError, match="returned a str, not a model"):
        bagcert.create_model("plain")
    with pytest.raises(TypeError, match=r"returned a _NoGeometry with no geometry; set self.geometry = bagcert.Geometry.from_layers"):
        bagcert.create_model("no_geometry")
    assert bagcert.create_model("duck", num_classes=4).config == {"name": "duck", "kwargs": {"num_classes": 4}}
    # the CLI: one line before any data is read
    with pytest.raises(SystemExit) as exc:
        train.main(["--model", "lin", "--dataset", "synthetic:16", "--output", str(tmp_path / "run")])
    assert "\n" not in exc.value.code and "returned a Linear without local_logits" in exc.value.code
    assert not (tmp_path / "run").exists()


def test_model_module_errors_are_one_line_with_file_and_line(registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_module(tmp_path, "boom", "import bagcert\nx = 1\nraise RuntimeError('boom')\n")
    cases = {
        "missing.py": "--model-module missing.py: file not found; expected a .py file",
        "boom.py": "--model-module boom.py: failed to import: RuntimeError: boom (boom.py, line 3)",
        "no_such_pkg.models": "--model-module no_such_pkg.models: no module named 'no_such_pkg'",
        "boom": "--model-module boom: failed to import: RuntimeError: boom",  # a dotted name ('.' is on sys.path here)
    }
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, message in cases.items():
        with pytest.raises(SystemExit) as exc:
            train.main(["--model", "x", "--model-module", spec, "--dataset", "synthetic:16", "--output", str(tmp_path / "run")])
        assert exc.value.code.startswith(message) and "\n" not in exc.value.code, exc.value.code
    sys.modules.pop("boom", None)
    _write_module(tmp_path, "syntax", "def broken(:\n")
    with pytest.raises(SystemExit) as exc:  # the location once, not twice
        train.main(["--model", "x", "--model-module", "syntax.py", "--dataset", "synthetic:16", "--output", str(tmp_path / "run")])
    assert re.fullmatch(r"--model-module syntax\.py: failed to import: SyntaxError: [^()]+ \(syntax\.py, line 1\)",
                        exc.value.code), exc.value.code
    with pytest.raises(SystemExit, match="--model-module missing.py: file not found"):
        certify.main(["--checkpoint", "x.pt", "--model-module", "missing.py", "--output", str(tmp_path / "o")])


def test_registration_twice(registry, tmp_path):
    path = _write_module(tmp_path, "twice_models", MODEL_CODE.format(cls="TwiceNet") + """
    bagcert.register_model("twice_net", TwiceNet)
""")
    first = bagcert.load_model_module(path)
    assert bagcert.load_model_module(str(path)) is first  # once per file
    # the same definition executed again (the file imported under another module name) registers again
    import importlib.util

    spec = importlib.util.spec_from_file_location("twice_models_again", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert bagcert.create_model("twice_net").config["name"] == "twice_net"
    # another definition under a taken name is refused, naming the first
    with pytest.raises(ValueError, match=r"model 'twice_net' is already registered by TwiceNet in .*twice_models.py; choose another name"):
        bagcert.register_model("twice_net", _DuckModel)
    with pytest.raises(ValueError, match="already registered by CifarBagNet"):
        bagcert.register_model("cifar_bagnet5", _DuckModel)


def test_save_checkpoint_needs_a_registered_name(registry, tmp_path):
    with pytest.raises(ValueError, match="model has no registry config .*bagcert.register_model\\(name, factory\\)"):
        bagcert.save_checkpoint(tmp_path / "a.pt", _DuckModel())
    model = bagcert.create_model("cifar_bagnet5", num_classes=10, width=8)
    model.config = {"name": "unregistered_net", "kwargs": {}}
    with pytest.raises(ValueError, match="'unregistered_net', which is not registered"):
        bagcert.save_checkpoint(tmp_path / "b.pt", model)
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()


def test_train_refuses_a_wrongly_declared_geometry_before_the_first_step(registry, tmp_path, monkeypatch):
    """Regression: a plugin model with a 5 px receptive field declared as 3 px trained with in-training
    certificates computed from the wrong geometry and only failed with a traceback when saving."""
    monkeypatch.chdir(tmp_path)
    _write_module(tmp_path, "wrong_rf", """
        import bagcert
        from torch import nn

        class K5(bagcert.BagModel):
            def __init__(self, num_classes=10):
                super().__init__(num_classes, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
                self.conv = nn.Conv2d(3, num_classes, 5, padding=2)  # the same grid as the declared 3x3
                self.geometry = bagcert.Geometry.from_layers([(3, 1, 1)])

            def features_to_logits(self, x):
                return self.conv(x)

        bagcert.register_model("wrong_rf_k5", K5, "receptive field 5 declared as 3")
        """)
    with pytest.raises(SystemExit) as exc:
        train.main(["--model", "wrong_rf_k5", "--model-module", "wrong_rf.py", "--dataset", "synthetic:64",
                    "--batch-size", "16", "--max-steps", "2", "--threads", "1", "--no-tensorboard", "--no-progress",
                    "--output", str(tmp_path / "run")])
    message = exc.value.code
    assert "\n" not in message and "receptive field 3" in message and "receptive field 5" in message, message
    assert not (tmp_path / "run").exists()  # refused before anything is written
