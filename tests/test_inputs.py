"""Streaming input: lazily read folders, bad files, labels and class names, --limit, and shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from extractor.errors import ExtractionError
from extractor.inputs import FileImages, TensorImages, decode_file, folder_labels, read_class_names, scan_folder
from extractor.models import load_torchvision, make_bundle
from extractor.options import parse_shard, shard_device
from extractor.pipeline import extract_run, load_images
from extractor.settings import PathwaySettings
from extractor.variants import VariantSpec
from records import ImageRecord, PathwayRecord, RecordsFormatError, Shard, read_run, require_complete, run_status

ROOT = Path(__file__).resolve().parent.parent


def write_folder(root: Path, per_class: dict[str, int], size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, n in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = (rng.random((*size, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"img{i:04d}.{'png' if i % 2 else 'jpg'}")
    return root


def records_by_id(run: Path) -> tuple[dict[str, ImageRecord], dict[str, PathwayRecord]]:
    _, images, pathways = read_run(run)
    return {i.image_id: i for i in images}, {p.pathway_id: p for p in pathways}


def assert_same_records(a: Path, b: Path, same_sources: bool = True) -> None:
    ia, pa = records_by_id(a)
    ib, pb = records_by_id(b)
    assert ia and pa and sorted(ia) == sorted(ib) and sorted(pa) == sorted(pb)
    for k, x in ia.items():
        y = ib[k]
        assert (x.label, x.predicted, x.kind, x.variant_of, x.png) == (y.label, y.predicted, y.kind, y.variant_of,
                                                                       y.png)
        assert not same_sources or x.source == y.source
        np.testing.assert_array_equal(x.logits, y.logits)
    for k, p in pa.items():
        q = pb[k]
        for name in ("neuron_site", "neuron_channel", "neuron_rank", "edge_src_channel", "edge_dst_channel"):
            np.testing.assert_array_equal(getattr(p, name), getattr(q, name), err_msg=name)
        for name in ("neuron_contribution", "edge_weight", "saliency"):
            np.testing.assert_allclose(getattr(p, name), getattr(q, name), rtol=1e-5, atol=1e-7, err_msg=name)


def test_streaming_equals_eager_records(demo: tuple, tmp_path: Path) -> None:
    bundle, _ = demo
    folder = write_folder(tmp_path / "imgs", {"digit 1": 5, "digit 7": 6})
    files = scan_folder(folder)
    source = load_images(str(folder), bundle)
    assert isinstance(source, FileImages) and len(source) == 11 and source.reads == 0  # nothing decoded yet
    settings = [PathwaySettings(k=3)]
    specs = VariantSpec.parse("fgsm:eps=0.1,occlude")
    streamed = extract_run(bundle, source, settings, specs, tmp_path / "stream", batch_size=4, workers=2,
                           progress=False)
    # the old eager path: every image decoded into one tensor first
    x = torch.stack([decode_file(f, bundle.info.input_shape) for f in files])
    labels = torch.tensor([1] * 5 + [7] * 6)
    eager = TensorImages(x, labels, [str(f.relative_to(folder)) for f in files])
    extract_run(bundle, eager, settings, specs, tmp_path / "eager", batch_size=4, progress=False)
    assert streamed.images == 33 and not streamed.bad
    assert_same_records(tmp_path / "stream", tmp_path / "eager")
    imgs, _ = records_by_id(tmp_path / "stream")
    assert sorted({i.label for i in imgs.values()}) == [1, 7]


def test_limit_reads_only_what_it_needs(demo: tuple, tmp_path: Path) -> None:
    bundle, _ = demo
    folder = write_folder(tmp_path / "imgs", {"a": 120, "b": 80}, size=(12, 12))
    source = load_images(str(folder), bundle)
    assert isinstance(source, FileImages)
    summary = extract_run(bundle, source, [PathwaySettings(k=2)], [], tmp_path / "run", batch_size=4, limit=6,
                          progress=False)
    assert summary.images == 6 and source.reads == 6
    # resuming with a larger limit reads only the new files
    again = extract_run(bundle, source, [PathwaySettings(k=2)], [], tmp_path / "run", batch_size=4, limit=10,
                        progress=False)
    assert again.images == 4 and again.skipped_originals == 6 and source.reads == 10


def test_bad_files_are_skipped_listed_and_strict_fails(demo: tuple, tmp_path: Path) -> None:
    bundle, _ = demo
    folder = write_folder(tmp_path / "imgs", {"digit 2": 7})
    good = (folder / "digit 2" / "img0000.jpg").read_bytes()
    (folder / "digit 2" / "zero.png").write_bytes(b"")
    (folder / "digit 2" / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (folder / "digit 2" / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 30).astype(np.uint16)).save(folder / "digit 2" / "deep.png")
    summary = extract_run(bundle, load_images(str(folder), bundle), [PathwaySettings(k=2)], [], tmp_path / "run",
                          batch_size=3, workers=2, progress=False)
    assert summary.images == 7
    reasons = {b.source: b.reason for b in summary.bad}
    assert sorted(reasons) == ["digit 2/deep.png", "digit 2/junk.png", "digit 2/trunc.jpg", "digit 2/zero.png"]
    assert reasons["digit 2/zero.png"] == "empty file" and "truncated" in reasons["digit 2/trunc.jpg"]
    assert "mode I;16" in reasons["digit 2/deep.png"]
    status = run_status(tmp_path / "run")
    assert status.complete and status.skipped == reasons
    assert len(read_run(tmp_path / "run")[1]) == 7
    # the command line says so in its summary
    from typer.testing import CliRunner

    from pathx.cli import app

    res = CliRunner().invoke(app, ["extract", "--model", "demo", "--images", str(folder), "--out",
                                   str(tmp_path / "cli"), "--top-k", "2", "--loader-workers", "0"])
    assert res.exit_code == 0, res.output
    assert "7 images, 7 pathways" in res.stdout and "4 unreadable images skipped" in res.stdout
    with pytest.raises(ExtractionError, match=r"image digit 2/deep\.png: mode I;16"):
        extract_run(bundle, load_images(str(folder), bundle), [PathwaySettings(k=2)], [], tmp_path / "strict",
                    batch_size=3, strict=True, progress=False)


def test_labels_from_folders_and_class_names(demo: tuple, tmp_path: Path) -> None:
    bundle, _ = demo
    # WordNet-style folders on a 10-way model: ImageFolder's rule, sorted names -> 0..K-1
    folder = write_folder(tmp_path / "wn", {"n03000134": 1, "n01440764": 2, "n02102040": 1}, size=(8, 8))
    src = load_images(str(folder), bundle)
    assert [src.label(i) for i in range(len(src))] == [0, 0, 1, 2]
    assert src.label_names() == ("n01440764", "n02102040", "n03000134")
    # names of the model's classes map to those classes
    assert folder_labels(["digit 9", "digit 4"], bundle.info.class_names) == ({"digit 9": 9, "digit 4": 4}, True)
    assert folder_labels(["b", "a", "c"], ["x", "y"]) == ({"a": 0, "b": 1, "c": -1}, False)
    # a model without names takes the folder names when there is one folder per class
    torch.manual_seed(0)
    tiny = make_bundle(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)),
                       "tiny", (3, 8, 8))
    extract_run(tiny, load_images(str(folder), tiny), [PathwaySettings(k=2)], [], tmp_path / "run", progress=False)
    manifest, imgs, _ = read_run(tmp_path / "run")
    assert manifest.model.class_names == ("n01440764", "n02102040", "n03000134")
    assert sorted(i.label for i in imgs) == [0, 0, 1, 2]
    assert tiny.info.class_names == ("0", "1", "2")  # the caller's bundle is untouched
    # --class-names files: text, JSON list, JSON object
    (tmp_path / "n.txt").write_text("cat\ndog\n\n")
    (tmp_path / "n.json").write_text(json.dumps({"1": "dog", "0": "cat"}))
    (tmp_path / "l.json").write_text(json.dumps(["cat", "dog"]))
    assert read_class_names(tmp_path / "n.txt") == read_class_names(tmp_path / "n.json") == ("cat", "dog")
    assert read_class_names(tmp_path / "l.json") == ("cat", "dog")
    (tmp_path / "bad.json").write_text(json.dumps({"0": "cat", "2": "dog"}))
    with pytest.raises(ExtractionError, match="indices must be"):
        read_class_names(tmp_path / "bad.json")
    # torchvision's bundled ImageNet names, without weights and without a download
    r18 = load_torchvision("resnet18", untrained=True, input_size=32)
    assert len(r18.info.class_names) == 1000 and r18.info.class_names[0] == "tench"


def test_shard_parsing() -> None:
    assert parse_shard("1/3", {}) == Shard(1, 3)
    assert parse_shard(None, {"RANK": "2", "WORLD_SIZE": "4"}) == Shard(2, 4)
    assert parse_shard(None, {}) == Shard(0, 1)
    for bad in ("3/3", "a/2", "1"):
        with pytest.raises(ExtractionError, match="--shard"):
            parse_shard(bad, {})
    assert shard_device("cuda", {"LOCAL_RANK": "1"}) == "cuda:1" and shard_device("cpu", {"LOCAL_RANK": "1"}) == "cpu"


def _pathx(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pathx.cli", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or dict(os.environ))


@pytest.mark.slow
def test_shards_as_processes_and_under_torchrun_equal_one_run(tmp_path: Path, home: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PATHX_HOME=str(home))
    common = ["extract", "--model", "demo", "--images", "demo:test", "--limit", "40", "--batch-size", "6",
              "--top-k", "3", "--variants", "fgsm:eps=0.1,shift", "--loader-workers", "0"]
    whole = _pathx(*common, "--out", str(tmp_path / "whole"), env=env)
    shards = [_pathx(*common, "--out", str(tmp_path / "sharded"), "--shard", f"{i}/3", env=env) for i in range(3)]
    for p in [whole, *shards]:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    assert sorted(p.name for p in (tmp_path / "sharded").glob("part-*")) == [
        f"part-s{i:05d}-of-00003-{k:05d}" for i, n in ((0, 3), (1, 2), (2, 2)) for k in range(n)]
    assert_same_records(tmp_path / "whole", tmp_path / "sharded")
    require_complete(tmp_path / "sharded")
    torchrun = ROOT / ".venv" / "bin" / "torchrun"
    run = subprocess.run([str(torchrun) if torchrun.exists() else "torchrun", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "pathx.cli", *common, "--out",
                          str(tmp_path / "torchrun")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "(shard 0/2)" in run.stdout and "(shard 1/2)" in run.stdout
    assert {json.loads(f.read_text())["shards"] for f in (tmp_path / "torchrun" / "shards").glob("*.json")} == {2}
    assert_same_records(tmp_path / "whole", tmp_path / "torchrun")


def _free_port() -> int:
    from graphstore.server import free_port

    return free_port()


def test_load_refuses_an_unfinished_shard(demo: tuple, home: Path, tmp_path: Path) -> None:
    bundle, _ = demo
    images = load_images("demo:test", bundle, home)
    out = tmp_path / "run"
    extract_run(bundle, images, [PathwaySettings(k=2)], [], out, batch_size=4, limit=12, shard=Shard(0, 3),
                progress=False)
    with pytest.raises(RecordsFormatError, match=r"shards 1, 2 of 3 not finished"):
        require_complete(out)
    env = dict(os.environ, NEO4J_URI="bolt://127.0.0.1:1", NEO4J_PASSWORD="x")
    for args in (["load", str(out)], ["db", "import", str(out), "--overwrite"]):
        p = _pathx(*args, env=env)
        _, err = p.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and "not finished (shards 1, 2 of 3" in lines[0], err
    extract_run(bundle, images, [PathwaySettings(k=2)], [], out, batch_size=4, limit=12, shard=Shard(1, 3),
                progress=False)
    with pytest.raises(RecordsFormatError, match=r"shard 2 of 3 not finished"):
        require_complete(out)
    # a whole (unsharded) pass over the same folder finishes it: only shard 2's block is new
    last = extract_run(bundle, images, [PathwaySettings(k=2)], [], out, batch_size=4, limit=12, progress=False)
    assert last.images == 4 and last.skipped_originals == 8
    require_complete(out)
    assert len(read_run(out)[1]) == 12
    p = _pathx("db", "import", str(out), "--overwrite", env=env)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "cannot import into NEO4J_URI" in err


def test_wordnet_folders_get_their_imagenet_index() -> None:
    """Imagenette's 10 wnid folders (any subset of the 1,000) map to their ImageNet indices on a
    1,000-way model, also in the ``n01440764_tench`` style; a wnid outside ImageNet is one line."""
    names = [str(i) for i in range(1000)]
    imagenette = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042",
                  "n03425413", "n03445777", "n03888257"]
    labels, matched = folder_labels(imagenette, names)
    assert matched and [labels[f] for f in imagenette] == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    named = ["n02102040_English_springer", "n01440764-tench"]
    assert folder_labels(named, names)[0] == {"n02102040_English_springer": 217, "n01440764-tench": 0}
    with pytest.raises(ExtractionError, match=r"n99999999.*not one of ImageNet's"):
        folder_labels(["n01440764", "n99999999"], names)
