"""The user's own model: FILE.py:FACTORY, package.module:FACTORY, TorchScript, and every way it can fail."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from extractor.errors import ExtractionError
from extractor.launch import model_from_spec
from extractor.models import ModelOptions, load_user_model
from extractor.sites import hook_count
from records import read_run

ROOT = Path(__file__).resolve().parent.parent

MODEL_CODE = textwrap.dedent('''
    import torch
    from torch import nn


    class SmallNet(nn.Module):
        input_shape = (3, 20, 20)
        mean = (0.5, 0.5, 0.5)
        std = (0.25, 0.25, 0.25)
        class_names = ("cat", "dog", "owl")

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3),
                                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.features(x))


    def make():
        torch.manual_seed(0)
        return SmallNet()


    def explodes():
        raise RuntimeError("no GPU here")


    def not_a_module():
        return 42


    def wrong_output():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
''')


@pytest.fixture()
def user_files(tmp_path: Path) -> Path:
    (tmp_path / "mynet.py").write_text(MODEL_CODE)
    pkg = tmp_path / "lab" / "models"
    pkg.mkdir(parents=True)
    (tmp_path / "lab" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text(MODEL_CODE)
    folder = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for cls in ("dog", "owl"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray((rng.random((30, 26, 3)) * 255).astype(np.uint8)).save(folder / cls / f"{i}.png")
    return tmp_path


def test_factory_file_module_and_attributes(user_files: Path, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    bundle = load_user_model(f"{user_files / 'mynet.py'}:make")
    assert bundle.info.arch == "make" and bundle.info.input_shape == (3, 20, 20)
    assert bundle.info.class_names == ("cat", "dog", "owl")
    assert [s.site_id for s in bundle.sites] == ["features.1#0", "features.4#0"]
    assert torch.allclose(bundle.mean, torch.tensor([0.5] * 3)) and torch.allclose(bundle.std, torch.tensor([0.25] * 3))
    monkeypatch.syspath_prepend(str(user_files))
    other = model_from_spec("lab.models:make", home, opts=ModelOptions(input_size=24, class_names=["a", "b", "c"]))
    assert other.info.input_shape == (3, 24, 24) and other.info.class_names == ("a", "b", "c")
    assert other.info.model_id == bundle.info.model_id  # same weights, same id
    # a state_dict on top of the factory's model
    torch.save({k: v * 0 + 0.01 for k, v in bundle.model.state_dict().items()}, user_files / "w.pth")
    loaded = load_user_model(f"{user_files / 'mynet.py'}:make", user_files / "w.pth")
    head = loaded.model.get_submodule("head")
    assert isinstance(head, nn.Linear) and float(head.weight.detach().flatten()[0]) == pytest.approx(0.01)
    assert loaded.info.model_id != bundle.info.model_id


def test_torchscript_sequential_runs_through_hooks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    torch.jit.script(net).save(str(tmp_path / "net.pt"))
    bundle = load_user_model(str(tmp_path / "net.pt"), opts=ModelOptions(input_size=8))
    assert [s.site_id for s in bundle.sites] == ["1#0", "2.1#0"]
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(bundle.model(x), net(x), atol=1e-6) and hook_count(bundle.model) == 0

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x).relu().flatten(1)

    torch.jit.script(Branchy()).save(str(tmp_path / "branchy.pt"))
    with pytest.raises(ExtractionError, match="compiled code that activation hooks cannot see"):
        load_user_model(str(tmp_path / "branchy.pt"))


def _pathx(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NEO4J_URI="bolt://127.0.0.1:1", NEO4J_PASSWORD="x")
    return subprocess.run([sys.executable, "-m", "pathx.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, check=False, timeout=300)


def test_user_model_from_cli(user_files: Path) -> None:
    out = user_files / "run"
    res = _pathx("extract", "--model", f"{user_files / 'mynet.py'}:make", "--images", str(user_files / "photos"),
                 "--out", str(out), "--top-k", "2", "--loader-workers", "0")
    assert res.returncode == 0, res.stderr
    manifest, images, pathways = read_run(out)
    assert manifest.model.class_names == ("cat", "dog", "owl") and len(images) == 6 and len(pathways) == 6
    assert sorted(i.label for i in images) == [1, 1, 1, 2, 2, 2]  # folders named after classes
    (user_files / "names.txt").write_text("x\ny\nz\n")
    res = _pathx("extract", "--model", "lab.models:make", "--images", str(user_files / "photos"), "--out",
                 str(user_files / "run2"), "--class-names", str(user_files / "names.txt"), "--limit", "2")
    assert res.returncode == 1 and "cannot import module 'lab.models'" in res.stderr  # not on the path
    env_res = subprocess.run(
        [sys.executable, "-m", "pathx.cli", "extract", "--model", "lab.models:make", "--images",
         str(user_files / "photos"), "--out", str(user_files / "run2"), "--class-names",
         str(user_files / "names.txt"), "--limit", "2", "--mean", "0.4,0.4,0.4", "--std", "0.2,0.2,0.2"],
        capture_output=True, text=True, cwd=ROOT, check=False, timeout=300,
        env=dict(os.environ, PYTHONPATH=f"{user_files}{os.pathsep}{ROOT}"))
    assert env_res.returncode == 0, env_res.stderr
    manifest, images, _ = read_run(user_files / "run2")
    assert manifest.model.class_names == ("x", "y", "z") and len(images) == 2
    assert sorted(i.label for i in images) == [0, 0]  # no folder is named x/y/z: ImageFolder's sorted rule


@pytest.mark.parametrize(("spec", "extra", "message"), [
    ("{d}/nofile.py:make", [], "model file {d}/nofile.py does not exist"),
    ("{d}/mynet.py:nothing", [], "has no function 'nothing'"),
    ("{d}/mynet.py:explodes", [], "explodes() raised RuntimeError: no GPU here"),
    ("{d}/mynet.py:not_a_module", [], "not_a_module() returned int, not a torch nn.Module"),
    ("{d}/mynet.py:wrong_output", [], "output must be class scores [batch, classes]"),
    ("{d}/mynet.py:make", ["--mean", "0.5,0.5"], "mean has 2 values for 3 input channels"),
    ("{d}/mynet.py:make", ["--mean", "a,b,c"], "--mean must be comma-separated numbers"),
    ("{d}/mynet.py:make", ["--weights-file", "{d}/missing.pth"], "weights file"),
    ("{d}/mynet.py:make", ["--class-names", "{d}/mynet.py"], "class names given for a model with 3 outputs"),
    ("{d}/mynet.py:make", ["--shard", "5/2"], "--shard 5/2"),
    ("{d}/mynet.py", [], "expected FILE.py:FUNCTION"),
    ("{d}/notes.pt", [], "is not a TorchScript file"),
    ("no_such_pkg.mod:make", [], "cannot import module 'no_such_pkg.mod'"),
    ("{d}/mynet.py:", [], "expected FILE.py:FUNCTION"),
])
def test_user_model_errors_are_one_line_and_write_nothing(user_files: Path, spec: str, extra: list[str],
                                                          message: str) -> None:
    from typer.testing import CliRunner

    from pathx.cli import app

    d = str(user_files)
    (user_files / "notes.pt").write_bytes(b"not a zip")
    out = user_files / "never"
    res = CliRunner().invoke(app, ["extract", "--model", spec.format(d=d), "--images", str(user_files / "photos"),
                                   "--out", str(out), *[e.format(d=d) for e in extra]])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and message.format(d=d) in lines[0], res.output
    assert lines[0].startswith("error: ") and "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)  # a clean exit, not a crash
    assert not out.exists()
