"""Hostile image files stay harmless: one folder of them, one `pathx extract` run at 224 px.

The run finishes, skips and lists exactly the bad files with their reasons, prints no traceback
and stays under a stated memory bound (peak RSS of the process, measured by a parent that has no
other child). A folder of only unreadable files, and an empty one, are one-line errors.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

MEMORY_BOUND_MB = 1500  # peak RSS of the whole `pathx extract` process (torch included)

MODEL = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                        nn.Linear(128, 16), nn.ReLU(), nn.Linear(16, 3))
    net.input_size = 224
    return net
'''


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def decompression_bomb(path: Path, side: int = 30_000, rows: int = 1_000) -> None:
    """A valid greyscale PNG of ``side`` x ``side`` zeros (900 MB decoded) in under 1 MB: identical
    deflate blocks after full flushes, then the stream's real Adler-32 (``rows`` must divide ``side``)."""
    block = (b"\0" * (side + 1)) * rows
    co = zlib.compressobj(9)
    first = co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)
    again = co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(side // rows):
        adler = zlib.adler32(block, adler)
    data = first + again * (side // rows - 1) + b"\x01\x00\x00\xff\xff" + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))


def hostile_folder(root: Path) -> tuple[set[str], set[str]]:
    """The folder; returns (files that must be skipped, files that must be read)."""
    root.mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    decompression_bomb(root / "bomb.png")
    Image.fromarray(rng.integers(0, 255, (4, 20_000), dtype=np.uint8)).save(root / "strip.png")  # 20,000 x 4
    Image.fromarray(rng.integers(0, 255, (20_000, 3), dtype=np.uint8)).save(root / "pole.png")  # 3 x 20,000
    rgb.convert("CMYK").save(root / "cmyk.jpg")
    rgb.convert("P").save(root / "palette.png")
    rgb.convert("LA").save(root / "grey_alpha.png")
    frames = [rgb, rgb.rotate(90), rgb.rotate(180)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one_pixel.png")
    rgb.rotate(90).save(root / "really_a_png.jpg", format="PNG")  # mis-named
    rgb.rotate(270).save(root / "new\nline.png")
    rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "naïve 写真.png")
    (root / "loop").symlink_to(root, target_is_directory=True)  # a symlink loop
    (root / "text.png").write_text("not an image")
    good = rgb.copy()
    good.save(root / "truncated.jpg")
    (root / "truncated.jpg").write_bytes((root / "truncated.jpg").read_bytes()[:200])
    (root / "empty.png").write_bytes(b"")
    bad = {"bomb.png", "text.png", "truncated.jpg", "empty.png"}
    ok = {"strip.png", "pole.png", "cmyk.jpg", "palette.png", "grey_alpha.png", "animated.gif", "one_pixel.png",
          "really_a_png.jpg", "new\nline.png", "naïve 写真.png"}
    return bad, ok


def run_measured(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """``pathx ARGS`` in a fresh parent whose only child it is; returns the result and its peak RSS in MB."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(r.returncode)")
    pathx = str(Path(sys.executable).parent / "pathx")
    res = subprocess.run([sys.executable, "-c", code, pathx, *args], capture_output=True, text=True, cwd=cwd,
                         timeout=600)
    peak = [line for line in res.stderr.splitlines() if line.startswith("PEAK ")]
    return res, int(peak[-1].split()[1]) / 1024 if peak else float("nan")


def test_a_folder_of_hostile_files_finishes_and_lists_exactly_the_bad_ones(tmp_path: Path) -> None:
    bad, ok = hostile_folder(tmp_path / "images")
    (tmp_path / "net.py").write_text(MODEL)
    res, peak_mb = run_measured(["extract", "--model", f"{tmp_path / 'net.py'}:build", "--images",
                                 str(tmp_path / "images"), "--out", str(tmp_path / "run"), "--top-k", "2",
                                 "--exemplars", "0", "--loader-workers", "0", "--batch-size", "4"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    assert f"{len(ok)} images" in res.stdout and f"{len(bad)} unreadable images skipped" in res.stdout
    # unlabelled files: no accuracy is claimed (the prediction never stands in for the label)
    assert "accuracy original" not in res.stdout and f"{len(ok)} originals have no label" in res.stdout
    status = json.loads(next((tmp_path / "run" / "shards").glob("*.json")).read_text())
    assert set(status["skipped"]) == bad
    assert status["skipped"]["bomb.png"].startswith("refused as a decompression bomb")
    from records import read_run

    _, images, _ = read_run(tmp_path / "run")
    assert {i.source for i in images} == ok
    assert peak_mb < MEMORY_BOUND_MB, f"peak RSS {peak_mb:.0f} MB"


def test_all_unreadable_and_empty_folders_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(MODEL)
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"x{i}.jpg").write_text("no")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    args = ["--model", f"{tmp_path / 'net.py'}:build", "--loader-workers", "0", "--exemplars", "0"]
    res, _ = run_measured(["extract", *args, "--images", str(broken), "--out", str(tmp_path / "r1")], tmp_path)
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "none of the 3 images could be read (3 skipped; first: x0.jpg" in lines[0]
    assert not (tmp_path / "r1").exists()
    res, _ = run_measured(["extract", *args, "--images", str(empty), "--out", str(tmp_path / "r2")], tmp_path)
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "no image files" in lines[0] and "1 other files skipped" in lines[0]
    assert "Traceback" not in res.stderr


def test_a_bomb_under_pillows_own_refusal_is_refused_before_decoding(tmp_path: Path) -> None:
    """9,500 x 9,500 (90 MP): Pillow only warns there; we refuse it from the header, in one line."""
    import pytest

    from extractor.inputs import BadImage, decode_file

    decompression_bomb(tmp_path / "b.png", side=9_500, rows=500)
    with pytest.raises(BadImage, match=r"^refused as a decompression bomb: 9500 x 9500 pixels is over"):
        decode_file(tmp_path / "b.png", (3, 224, 224))
