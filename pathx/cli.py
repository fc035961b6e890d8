"""``pathx``: a thin command line over extractor, graphstore and ui.

Every failure the user can fix ends in one line on stderr and exit code 1 (2 for usage). Each command
parses its options, makes one call into the packages (extraction settings: ``extractor.config``; named
queries: ``graphstore.ask``; serving the UI: ``ui.serve``; the demo's run: ``extractor.config.extract_demo``)
and prints. (Over 400 lines because of the option declarations: ``extract`` alone has 27 documented options.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from ui.serve import PORT as UI_PORT

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pathway Explorer: critical pathways of CNNs in Neo4j.")
db_app = typer.Typer(no_args_is_help=True, help="The local Neo4j server (or NEO4J_URI).")
app.add_typer(db_app, name="db")

log = logging.getLogger("pathx")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@contextmanager
def _errors() -> Iterator[None]:
    import neo4j.exceptions

    from extractor.errors import ExtractionError
    from graphstore.errors import GraphStoreError
    from records import RecordsFormatError

    try:
        yield
    except (ExtractionError, GraphStoreError, RecordsFormatError) as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except (neo4j.exceptions.ServiceUnavailable, neo4j.exceptions.SessionExpired) as exc:
        _fail(f"lost the connection to Neo4j ({type(exc).__name__}); nothing half-written stays: "
              "start the database again and re-run the same command to resume")
    except neo4j.exceptions.Neo4jError as exc:
        _fail(f"Neo4j refused the operation: {(exc.message or str(exc)).splitlines()[0]}")
    except KeyboardInterrupt:
        _fail("interrupted; re-run the same command to resume")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _home() -> Path:
    from graphstore.server import default_home

    return default_home()


def _echo_json(value: Any) -> None:
    def default(o: Any) -> Any:
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        if hasattr(o, "tolist"):
            return o.tolist()
        if isinstance(o, bytes):
            return f"<{len(o)} bytes>"
        return str(o)

    typer.echo(json.dumps(value, default=default, indent=1))


# --- database -------------------------------------------------------------------------------


@db_app.command("fetch")
def db_fetch() -> None:
    """Fetch the Neo4j 5.26 server and Browser jars with Maven (once)."""
    from graphstore.server import ServerConfig, fetch_jars

    with _errors():
        typer.echo(str(fetch_jars(ServerConfig.default(_home()))))


def _external() -> bool:
    return bool(os.environ.get("NEO4J_URI"))


@db_app.command("start")
def db_start(
    bolt_port: Annotated[int, typer.Option(help="Bolt port on 127.0.0.1.")] = 7687,
    http_port: Annotated[int, typer.Option(help="HTTP (Browser) port on 127.0.0.1.")] = 7474,
) -> None:
    """Start the local Neo4j (returns when Bolt answers). Does nothing when NEO4J_URI is set."""
    from graphstore.server import ServerConfig, start

    if _external():
        typer.echo(f"NEO4J_URI is set ({os.environ['NEO4J_URI']}); not starting a local server")
        return
    with _errors():
        base = ServerConfig.default(_home())
        cfg = dataclasses.replace(base, bolt_port=bolt_port, http_port=http_port)
        st = start(cfg)
        typer.echo(f"Neo4j running (pid {st.pid}) at {st.bolt_uri}; Browser: {st.browser_url} (user neo4j, "
                   f"password in {cfg.password_file})")


@db_app.command("stop")
def db_stop() -> None:
    """Stop the local Neo4j cleanly."""
    from graphstore.server import ServerConfig, stop

    if _external():
        typer.echo("NEO4J_URI is set; there is no local server to stop")
        return
    with _errors():
        typer.echo("stopped" if stop(ServerConfig.default(_home())) else "not running")


@db_app.command("status")
def db_status() -> None:
    """Whether the database answers (exit 1 when it does not)."""
    from graphstore.server import ServerConfig, status

    with _errors():
        if _external():
            _store()
            typer.echo(f"running (external) at {os.environ['NEO4J_URI']}")
            return
        st = status(ServerConfig.default(_home()))
        typer.echo(f"{st.detail}: {st.bolt_uri} (pid {st.pid})" if st.pid else st.detail)
        if not st.running:
            raise typer.Exit(1)


@db_app.command("import")
def db_import(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders written by `pathx extract`.")],
    overwrite: Annotated[bool, typer.Option(help="Required: the import replaces the whole database.")] = False,
) -> None:
    """Bulk-load runs into a fresh local database with neo4j-admin (replaces its content)."""
    from graphstore.bulk import bulk_import
    from graphstore.errors import GraphStoreError
    from graphstore.server import ServerConfig, load_state
    from records import read_manifest, require_complete

    with _errors():
        for run in run_dirs:  # bad input first, before anything about the server
            read_manifest(run)
            require_complete(run)
        if _external():
            raise GraphStoreError("bulk import writes the local server's files; it cannot import into NEO4J_URI "
                                  "(use `pathx load`, or run neo4j-admin on that server)")
        cfg = load_state(ServerConfig.default(_home()))
        s = bulk_import(cfg, run_dirs, _driver, overwrite=overwrite)
        typer.echo(f"{s.nodes} nodes, {s.relationships} relationships: CSV {s.csv_seconds:.1f} s, import "
                   f"{s.import_seconds:.1f} s ({s.relationships_per_second:.0f} rel/s), restart and indexes "
                   f"{s.finish_seconds:.1f} s")


@db_app.command("uri")
def db_uri() -> None:
    """The Bolt URI commands use."""
    from graphstore.server import ServerConfig, load_state

    typer.echo(os.environ.get("NEO4J_URI") or load_state(ServerConfig.default(_home())).bolt_uri)


def _driver() -> Any:
    from graphstore.connection import open_driver, settings_from_env

    return open_driver(settings_from_env(_home()))


def _store() -> Any:
    from graphstore.api import Store

    return Store.connect(_home())


# --- extraction -----------------------------------------------------------------------------


@app.command("train-demo")
def train_demo() -> None:
    """Train the demo's Fashion-MNIST CNN again (deterministic, ~2 min) and set it beside the committed weights."""
    import torch

    from extractor.demo import accuracy
    from extractor.fashion import WEIGHTS, file_sha256, split, train_fashion_cnn
    from extractor.trained import TRAINED, load_trained

    with _errors():
        model = train_fashion_cnn()
        out = _home() / "models" / "fashion-cnn-retrained.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out)
        x, y = split("test")
        ours, committed = accuracy(model, x, y), accuracy(load_trained(TRAINED["fashion_cnn"]), x, y)
        same = "the same bytes as" if file_sha256(out) == file_sha256(WEIGHTS) else "other bytes than"
        typer.echo(f"retrained {out}: test accuracy {ours:.4f} on 10,000 images (committed weights {committed:.4f}); "
                   f"{same} {WEIGHTS.name}")


@app.command("extract")
def extract(
    model: Annotated[str, typer.Option(
        help="'demo', a torchvision classifier name (resnet18, ...), FILE.py:FACTORY, package.module:FACTORY "
             "or a TorchScript file.")],
    images: Annotated[str, typer.Option(help="demo:test, demo:train, a folder (one sub-folder per class) or a file.")],
    out: Annotated[Path, typer.Option(help="Run folder for the record files.")],
    method: Annotated[str, typer.Option(
        help="Comma-separated: mct, intgrad (Khakzar), correlation, precision (Lengerich), pixel (Lyu).")] = "mct",
    sparsity: Annotated[float | None, typer.Option(help="Global percentile selection p in [0, 100).")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Top-k channels per site (default 8).")] = None,
    granularity: Annotated[str, typer.Option(help="element or channel (percentile rule).")] = "element",
    variants: Annotated[str, typer.Option(
        help="e.g. fgsm,pgd,occlude,shift,deform,affine or pgd:eps=0.1:steps=5.")] = "",
    limit: Annotated[int | None, typer.Option(help="Only the first N images (files in sorted order); "
                                                    "nothing past them is read.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    weights_file: Annotated[Path | None, typer.Option(help="Local weights (a state_dict) for the model.")] = None,
    untrained: Annotated[bool, typer.Option(help="Random weights (structure and speed only).")] = False,
    input_size: Annotated[int | None, typer.Option(
        help="Input side (default 224, or the model's input_size / input_shape attribute).")] = None,
    channels: Annotated[int | None, typer.Option(help="Input channels of your own model (default 3).")] = None,
    mean: Annotated[str | None, typer.Option(help="Your model's per-channel mean, e.g. 0.5,0.5,0.5.")] = None,
    std: Annotated[str | None, typer.Option(help="Your model's per-channel std.")] = None,
    class_names: Annotated[Path | None, typer.Option(
        help="Class names: a text file (one per line) or JSON (list, or index -> name).")] = None,
    sites: Annotated[str | None, typer.Option(help="Comma-separated module paths to use as sites.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK).")] = "cpu",
    loader_workers: Annotated[int | None, typer.Option(
        help="Processes decoding images (0 = in this process; default: cores - 2, at most 4).")] = None,
    shard: Annotated[str | None, typer.Option(
        help="I/N: this process takes share I of N (0-based); under torchrun RANK/WORLD_SIZE.")] = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first unreadable image instead of skipping it.")] = False,
    exemplars: Annotated[int, typer.Option(help="Top-N images kept per neuron (0 = none).")] = 9,
    pixel_stride: Annotated[int, typer.Option(help="Pixel pathways: trace every n-th pixel.")] = 2,
    pixel_beam: Annotated[int, typer.Option(help="Pixel pathways: beam width.")] = 3,
    pixel_top: Annotated[int, typer.Option(help="Pixel pathways: chains kept per pixel.")] = 3,
    originals_only: Annotated[str, typer.Option(
        help="Comma-separated methods to run on originals only (not on variants).")] = "",
    resamples: Annotated[int, typer.Option(help="Resampling methods: perturbed copies.")] = 50,
    variant_kinds: Annotated[str, typer.Option(
        help="METHOD=KIND+KIND,...: run METHOD on variants of these kinds only, e.g. pixel=deform+occlude.")] = "",
) -> None:
    """Extract pathways (and variants) into record files, streaming the images."""
    from extractor.config import (
        build_settings,
        default_workers,
        model_from_spec,
        model_options,
        parse_shard,
        parse_variant_kinds,
        shard_device,
    )
    from extractor.pipeline import extract_run, load_images
    from extractor.variants import VariantSpec

    with _errors():
        settings = build_settings(method.split(","), top_k, sparsity, granularity, pixel_beam, pixel_top,
                                  pixel_stride, originals_only.split(","), resamples,
                                  parse_variant_kinds(variant_kinds))
        specs = VariantSpec.parse(variants)
        part = parse_shard(shard)
        opts = model_options(input_size, channels, mean, std, class_names, sites)
        bundle = model_from_spec(model, _home(), weights_file, untrained, opts)
        summary = extract_run(bundle, load_images(images, bundle, _home()), settings, specs, out,
                              batch_size=batch_size, limit=limit, device=shard_device(device), shard=part,
                              strict=strict, workers=default_workers() if loader_workers is None else loader_workers,
                              exemplars=exemplars)
        where = f" (shard {part.index}/{part.count})" if part.count > 1 else ""
        _echo_extraction(summary, where)


def _echo_extraction(summary: Any, where: str = "") -> None:
    rate = summary.images / summary.seconds if summary.seconds else 0.0
    typer.echo(f"{summary.images} images, {summary.pathways} pathways, {summary.edges} edges in "
               f"{summary.seconds:.1f} s ({rate:.1f} images/s){where}; {summary.skipped_originals} originals "
               f"already done; {len(summary.bad)} unreadable images skipped")
    from graphstore.names import variant_name

    for (kind, setting), acc in summary.accuracy().items():
        right, total = summary.correct[(kind, setting)]
        typer.echo(f"  accuracy {variant_name(kind, setting)}: {acc:.3f} ({right} of {total} labelled)")
    if summary.unlabelled:
        typer.echo(f"  {summary.unlabelled} originals have no label: no accuracy for them")


# --- graph store ----------------------------------------------------------------------------


@app.command("load")
def load(
    run_dir: Annotated[Path, typer.Argument(help="Run folder written by `pathx extract`.")],
    workers: Annotated[int, typer.Option(min=1, max=32,
                                         help="Write transactions in flight at once (more cores: try 2-4; "
                                              "lock conflicts are retried).")] = 1,
) -> None:
    """Load a run into Neo4j (idempotent; resumes after a crash)."""
    from graphstore.loader import load_run
    from records import read_manifest, require_complete

    with _errors():
        read_manifest(run_dir)  # bad input fails before any connection is made
        require_complete(run_dir)
        with _store() as store:
            s = load_run(store.driver, run_dir, database=store.database, workers=workers)
        typer.echo(f"{s.images} images, {s.pathways_new} new pathways ({s.pathways_existing} already there), "
                   f"{s.includes + s.edges} relationships in {s.seconds:.1f} s "
                   f"({s.relationships_per_second:.0f}/s)")


def _query_names() -> str:
    from graphstore.ask import QUERY_NAMES

    return ", ".join(QUERY_NAMES)


@app.command("query")
def query(
    name: Annotated[str, typer.Argument(help=f"One of: {_query_names()}.")],
    cls: Annotated[str | None, typer.Option("--class", help="Class index, name or id.")] = None,
    cls_b: Annotated[str | None, typer.Option("--class-b", help="Second class (shared).")] = None,
    image: Annotated[str | None, typer.Option(help="Image id.")] = None,
    pathway: Annotated[str | None, typer.Option(help="Pathway id.")] = None,
    config: Annotated[str | None, typer.Option(help="Pathway setting key (default: the most common).")] = None,
    model: Annotated[str | None, typer.Option(help="Model id (default: the first).")] = None,
    kind: Annotated[str | None, typer.Option(help="Variant kind (hijacked, similar).")] = None,
    layer: Annotated[str | None, typer.Option(help="Site id, e.g. features.1#0.")] = None,
    neuron: Annotated[str | None, typer.Option(help="Neuron id (neuron card).")] = None,
    min_support: Annotated[float, typer.Option(help="Support threshold s.")] = 0.5,
    max_other: Annotated[float, typer.Option(help="Largest support elsewhere (signature).")] = 0.2,
    limit: Annotated[int, typer.Option(help="Rows.")] = 20,
) -> None:
    """Run a named query and print JSON."""
    import networkx as nx

    from graphstore.ask import QueryArgs, ask

    args = QueryArgs(cls, cls_b, image, pathway, config, model, kind, layer, neuron, min_support, max_other, limit)
    with _errors(), _store() as store:
        answer = ask(store, name, args)
        if isinstance(answer, nx.Graph) and answer.graph.get("cut_sites"):
            cut = answer.graph["cut_sites"]
            typer.echo(f"note: this pathway is cut at {len(cut)} site(s): {', '.join(cut)} (no neuron kept there "
                       "reads a neuron kept before it)", err=True)
        _echo_json(nx.node_link_data(answer, edges="edges") if isinstance(answer, nx.Graph) else answer)


@app.command("cypher")
def cypher(
    text: Annotated[str, typer.Argument(help="A read-only Cypher query.")],
    params: Annotated[str, typer.Option(help="Parameters as a JSON object.")] = "{}",
    timeout: Annotated[float, typer.Option(help="Time limit in seconds.")] = 10.0,
    max_rows: Annotated[int, typer.Option(help="Row cap.")] = 1000,
) -> None:
    """Run read-only Cypher (writes, schema changes, LOAD CSV and admin commands are refused)."""
    from graphstore.errors import QueryRefused

    with _errors():
        try:
            parsed = json.loads(params)
        except ValueError as exc:
            raise QueryRefused(f"--params is not valid JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise QueryRefused("--params must be a JSON object")
        with _store() as store:
            res = store.cypher(text, parsed, timeout_s=timeout, max_rows=max_rows)
        _echo_json({"columns": res.columns, "rows": res.rows, "truncated": res.truncated})


@app.command("export")
def export(
    out: Annotated[Path, typer.Argument(help="Output file: .graphml or .gexf.")],
    pathway: Annotated[list[str], typer.Option(help="Pathway id (repeat for several).")],
) -> None:
    """Export pathways as one graph for Gephi or Cytoscape."""
    from graphstore.export import export_pathways

    with _errors(), _store() as store:
        g = export_pathways(store, pathway, out)
        typer.echo(f"wrote {out}: {g.number_of_nodes()} neurons, {g.number_of_edges()} edges")


@app.command("report")
def report(
    out: Annotated[Path, typer.Option(help="Folder for report.md, numbers.json and the plots.")] = Path("docs/report"),
    photos: Annotated[int, typer.Option(min=2, max=20, help="Labelled ImageNet photos for EfficientNet-Lite0.")] = 20,
    fashion: Annotated[int, typer.Option(min=10, help="Fashion-MNIST test images behind the store-side sections.")]
    = 200,
    counts: Annotated[int, typer.Option(min=5, help="Fashion-MNIST test images per group for Lyu's counts.")] = 40,
    runs: Annotated[Path, typer.Option(help="Folder of the report's own runs (loaded into the store).")]
    = Path("runs/report"),
) -> None:
    """Measure each seed paper's claims on the two trained models (EfficientNet-Lite0 on ImageNet photos, the
    Fashion-MNIST CNN); extracts and loads the pathways it needs, writes a markdown report."""
    from pathx.report import ReportPlan, build_report

    with _errors():
        plan = ReportPlan(photos=photos, fashion=fashion, counts=counts, runs=runs)
        with _store() as store:
            path = build_report(store, _home(), out, plan, progress=lambda step: typer.echo(f"report: {step}"))
        typer.echo(f"wrote {path}")


# --- UI and demo ----------------------------------------------------------------------------


@app.command("ui")
def ui(
    port: Annotated[int, typer.Option(help="Port of the UI.")] = UI_PORT,
    address: Annotated[str, typer.Option(help="Address to bind (default loopback only).")] = "127.0.0.1",
) -> None:
    """Serve the Streamlit UI over whatever the database holds."""
    from ui.serve import serve

    with _errors():
        _driver().close()
    typer.echo(f"UI at http://{address}:{port}  (Ctrl-C to stop)")
    raise typer.Exit(serve(port, address))


@app.command("demo")
def demo(
    limit: Annotated[int | None, typer.Option(help="Fashion-MNIST test images for the Fashion CNN (default 60).")]
    = None,
    photos: Annotated[int | None, typer.Option(help="Labelled ImageNet photos for EfficientNet-Lite0 (default 8; "
                                                    "at most 20).")] = None,
    out: Annotated[Path, typer.Option(help="Folder of the two run folders.")] = Path("runs/demo"),
    serve: Annotated[bool, typer.Option(help="Serve the UI at the end.")] = True,
    port: Annotated[int, typer.Option(help="Port of the UI.")] = UI_PORT,
    percentile: Annotated[bool, typer.Option(help="Also Khakzar's own rule: MCT, global percentile p = 90.")] = True,
) -> None:
    """Start Neo4j, extract two trained models on real images (the Fashion-MNIST CNN, EfficientNet-Lite0 on
    ImageNet photos) with variants, load them into one store, serve the UI."""
    import time

    from extractor.config import extract_demo
    from graphstore.server import ServerConfig, has_database, load_state
    from ui import serve as ui_serve

    began = time.perf_counter()
    last = [began]

    def step(text: str) -> None:
        now = time.perf_counter()
        if now - last[0] > 0.5:
            typer.echo(f"  ({now - last[0]:.1f} s)")
        last[0] = now
        typer.echo(text)

    local = not _external()
    # a local store never used before takes the offline importer, which needs no running server
    fresh = local and not has_database(load_state(ServerConfig.default(_home())))
    if local and not fresh:
        step("step 1/4: Neo4j")
        db_start()
    step("step 2/4: extraction: Fashion CNN on Fashion-MNIST test images (all five methods, every variant kind), "
         "EfficientNet-Lite0 on ImageNet photos (FGSM, PGD, occluded, shifted, affine)")
    with _errors():
        sizes = {k: v for k, v in (("limit", limit), ("photos", photos)) if v is not None}
        for name, summary in extract_demo(out, _home(), percentile=percentile, **sizes).items():
            _echo_extraction(summary, f" [{name}]")
    runs = [out / "fashion", out / "photos"]
    if local and not fresh:
        with _store() as store:
            fresh = not store.models()
    if fresh:  # nothing to keep: the offline importer is the faster path (README)
        step("step 3/4: bulk import into the empty store")
        db_import(runs, overwrite=True)
    else:  # the store holds other runs: add to it, idempotently
        step("step 3/4: load into Neo4j")
        for run in runs:
            load(run)
    step(f"set-up done in {time.perf_counter() - began:.1f} s")
    browser = "your NEO4J_URI server" if _external() else ServerConfig.default(_home()).browser_url
    if serve:
        typer.echo(f"step 4/4: UI at http://127.0.0.1:{port}  |  Neo4j Browser: {browser}")
        raise typer.Exit(ui_serve.serve(port))
    typer.echo(f"done. Serve the UI with `pathx ui`; Neo4j Browser: {browser}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
