"""Extraction speed, side by side in one process: plain PyTorch, ours, and Captum.

(a) forward + backward to the input; (b) our channel contributions at all sites; (c) (b) plus
top-8 edges into each site from its predecessors in the site graph (one cut forward; the fast
path through a segment's one mixing layer where it applies, see extractor/mixing.py);
(d) Captum ``LayerGradientXActivation`` site by site;
(e) the same edges as (c) the way a Captum user gets them: one ``LayerGradientXActivation``
call per target neuron j with a forward function returning C_j. (e) is timed on a sample of
targets and scaled to all targets of (c); the JSON says how many were timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torchvision
from captum.attr import LayerGradientXActivation
from timing import _interleaved, _ours_b, _ours_c, _plain, _time, fast_routes

from extractor.models import ModelBundle, make_bundle
from extractor.settings import PathwaySettings
from extractor.sites import Capture, SiteHooks

K = 8


def _captum_d(bundle: ModelBundle, x: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    named = dict(bundle.model.named_modules())
    out = []
    for site in bundle.sites:
        lga = LayerGradientXActivation(bundle.forward, named[site.module_path])
        attr = lga.attribute(x, target=target)
        # detached: an attribution still attached to its forward graph keeps that whole graph alive
        out.append((attr if not isinstance(attr, list) else attr[0]).detach())
    return out


def _captum_edge(bundle: ModelBundle, x: torch.Tensor, src: int, dst: int, j: torch.Tensor,
                 g_dst: torch.Tensor) -> torch.Tensor:
    """w(i -> j) for all i, one Captum call: forward function = C_j (g fixed), layer = source site."""
    named = dict(bundle.model.named_modules())
    s_dst = bundle.sites[dst]
    s_src = bundle.sites[src]

    def forward(inp: torch.Tensor) -> torch.Tensor:
        with SiteHooks(bundle.model, Capture([s_dst])) as hooks:  # the one hook manager captures a_j
            rec = hooks.begin()
            bundle.forward(inp)
        a = rec.acts[s_dst.index]
        sel = a[torch.arange(a.shape[0]), j] * g_dst[torch.arange(a.shape[0]), j]
        out: torch.Tensor = sel.flatten(1).sum(1) if sel.dim() > 1 else sel
        return out

    lga = LayerGradientXActivation(forward, named[s_src.module_path])
    attr = lga.attribute(x)
    attr = attr.detach()
    summed: torch.Tensor = attr.flatten(2).sum(-1) if attr.dim() > 2 else attr
    return summed


def models() -> list[tuple[str, Callable[[], ModelBundle], int]]:
    from pathlib import Path

    from extractor.demo import demo_bundle
    from graphstore.server import default_home

    def tv(name: str) -> Callable[[], ModelBundle]:
        def make() -> ModelBundle:
            torch.manual_seed(0)
            return make_bundle(torchvision.models.get_model(name, weights=None).eval(), name, (3, 224, 224))

        return make

    def demo() -> ModelBundle:
        return demo_bundle(Path(default_home()))[0]

    return [("demo-cnn", demo, 32), ("resnet18", tv("resnet18"), 224), ("vgg16", tv("vgg16"), 224)]


def run(batch_sizes: tuple[int, ...] = (1, 16), captum_targets: int = 4,
        skip: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """One row per model x batch size; ``skip`` holds ``model:batch`` pairs left out."""
    torch.set_num_threads(2)
    rows = []
    for name, make, size in models():
        bundle = make()

        def once(site: Any, b: ModelBundle = bundle) -> bool:
            return sum(1 for o in b.sites if o.module_path == site.module_path) == 1

        channels = bundle.info.input_shape[0]
        for batch in batch_sizes:
            if f"{name}:{batch}" in skip:
                print(f"{name} b={batch}: skipped (--skip)", flush=True)
                continue
            torch.manual_seed(1)
            x = torch.rand(batch, channels, size, size)
            settings = PathwaySettings(k=K, edge_targets=K, edges_per_target=K)
            probe = _time(partial(_plain, bundle, x), 1)
            repeats = max(3, min(25, int(3.0 / max(probe, 1e-4))))  # >= 3 rounds, ~3 s of samples each
            a, b_t, c_t = _interleaved([partial(_plain, bundle, x), partial(_ours_b, bundle, x),
                                        partial(_ours_c, bundle, x, settings)], repeats)
            contrib, sel, edges = _ours_c(bundle, x, settings)
            routes = fast_routes(bundle, x)
            n_pairs, fast_pairs = sum(routes.values()), routes["mixing"]
            if repeats > 1:
                d_t = _time(partial(_captum_d, bundle, x, contrib.target), max(1, repeats // 5))
                ref = _captum_d(bundle, x, contrib.target)
            else:  # a big configuration: its one reference run is also its timing (no warm-up needed)
                began = time.perf_counter()
                ref = _captum_d(bundle, x, contrib.target)
                d_t = time.perf_counter() - began
            diff_d = max(float((r - e).detach().abs().max()) for r, e, s in zip(ref, contrib.element, bundle.sites,
                                                                       strict=True) if once(s))
            # (e): time a sample of targets of the first and the last edge of the site graph whose target
            # reads one site only (there Captum's total derivative is our partial one), scale to all
            # targets; values are compared where the source module runs once (Captum hooks a module)
            total_targets = n_pairs * K
            single = [(s.preds[0], s.index) for s in bundle.sites if len(s.preds) == 1]
            timed, diffs, spent = 0, [], 0.0
            for src, dst in (single[0], single[-1]):
                kept = sel.kept[dst][0]
                js = torch.nonzero(kept).flatten()[: max(1, captum_targets // 2)]
                for j in js.tolist():
                    jj = torch.full((batch,), j, dtype=torch.long)
                    began = time.perf_counter()
                    w = _captum_edge(bundle, x, src, dst, jj, contrib.grads[dst])
                    spent += time.perf_counter() - began
                    timed += 1
                    if not once(bundle.sites[src]):
                        continue  # Captum sees the last call of a reused module: no like-for-like value
                    mask = (edges.b == 0) & (edges.src_site == src) & (edges.dst_site == dst) & (edges.dst_channel == j)
                    for sc, wt in zip(edges.src_channel[mask], edges.weight[mask], strict=True):
                        diffs.append(abs(float(w[0, int(sc)].detach()) - float(wt)))
            e_t = spent / timed * total_targets
            rows.append({
                "model": name, "input": size, "batch": batch, "a_plain_s": a, "b_ours_contrib_s": b_t,
                "c_ours_edges_s": c_t, "d_captum_layer_s": d_t, "e_captum_per_neuron_s": e_t,
                "e_targets_timed": timed, "e_targets_total": total_targets, "site_pairs": n_pairs,
                "fast_pairs": fast_pairs,
                "ratio_b_a": b_t / a, "ratio_c_a": c_t / a, "ratio_d_b": d_t / b_t, "ratio_e_c": e_t / c_t,
                "max_abs_diff_b_vs_d": diff_d, "max_abs_diff_c_vs_e": max(diffs) if diffs else None,
                "images_per_s_with_edges": batch / c_t,
            })
            print(f"{name} b={batch}: a {a:.3f}s b/a {b_t / a:.2f} c/a {c_t / a:.2f} d/b {d_t / b_t:.1f} "
                  f"e/c {e_t / c_t:.1f}", flush=True)
    return rows


def pixel_rates() -> list[dict[str, Any]]:
    """Pixel pathways (beam 3, top 3) traced per second: demo CNN every 2nd pixel, VGG16 every 112th
    (pixel pathways need a chain of sites; ResNets branch and are refused)."""
    from extractor.pixelpaths import trace_pixels
    from extractor.settings import PixelSettings

    torch.set_num_threads(2)
    rows = []
    for (name, make, size), stride in zip(models()[::2], (2, 112), strict=True):
        bundle = make()
        torch.manual_seed(1)
        x = torch.rand(1, bundle.info.input_shape[0], size, size)
        settings = PixelSettings(stride=stride)
        began = time.perf_counter()
        traced = trace_pixels(bundle, x, settings)
        seconds = time.perf_counter() - began
        pixels = int(traced.chains.shape[0])
        rows.append({"model": name, "input": size, "stride": stride, "pixels": pixels, "seconds": seconds,
                     "pixels_per_s": pixels / seconds, "sites": len(bundle.sites)})
        print(f"pixel pathways {name}: {pixels} pixels in {seconds:.1f}s", flush=True)
    return rows


def exemplar_overhead(rounds: int = 3) -> list[dict[str, Any]]:
    """Extraction with ``--exemplars 9`` over ``--exemplars 0``: whole ``extract_run`` calls (receptive-field
    probing, tracking and the parts' exemplar files included), timed in alternating rounds."""
    import tempfile
    from pathlib import Path

    from extractor.demo import demo_bundle
    from extractor.inputs import TensorImages
    from extractor.pipeline import extract_run
    from graphstore.server import default_home

    torch.set_num_threads(2)
    demo, _ = demo_bundle(default_home())
    cases = [("demo-cnn", demo, 32, 512, 32), ("resnet18", make_bundle(torchvision.models.resnet18(weights=None),
                                                                       "resnet18", (3, 224, 224)), 224, 32, 16)]
    rows = []
    for name, bundle, size, n, batch in cases:
        torch.manual_seed(0)
        images = TensorImages(torch.rand(n, bundle.info.input_shape[0], size, size))

        def run(exemplars: int, b: ModelBundle = bundle, im: TensorImages = images, bs: int = batch) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                extract_run(b, im, [PathwaySettings(k=K)], [], Path(tmp) / "run", batch_size=bs,
                            exemplars=exemplars, progress=False)

        off, on = _interleaved([lambda: run(0), lambda: run(9)], rounds)
        rows.append({"model": name, "input": size, "images": n, "batch": batch, "seconds_off": off,
                     "seconds_on": on, "ratio": on / off})
        print(f"exemplars {name}: {on / off:.3f} ({off:.1f} s -> {on:.1f} s)", flush=True)
    return rows
