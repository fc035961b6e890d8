"""``pathx``: a thin command line over extractor, graphstore and ui.

Every failure the user can fix ends in one line on stderr and exit code 1 (2 for usage). Each command
parses its options, makes one call into the packages (extraction: ``extractor.options``, whose
``ExtractOptions`` fields are ``extract``'s options; named queries: ``graphstore.ask``; serving the UI:
``ui.serve``; the demo's runs: ``extractor.demo_runs``) and prints.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from graphstore.server import default_home
from ui.serve import PORT as UI_PORT

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pathway Explorer: critical pathways of CNNs in Neo4j.")
db_app = typer.Typer(no_args_is_help=True, help="The local Neo4j server (or NEO4J_URI).")
app.add_typer(db_app, name="db")

log = logging.getLogger("pathx")


def _fail(message: str) -> NoReturn:
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


def _echo_json(value: Any) -> None:
    from graphstore.results import as_row

    def default(o: Any) -> Any:
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return as_row(o)
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
        typer.echo(str(fetch_jars(ServerConfig.default(default_home()))))


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
        base = ServerConfig.default(default_home())
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
        typer.echo("stopped" if stop(ServerConfig.default(default_home())) else "not running")


@db_app.command("status")
def db_status() -> None:
    """Whether the database answers (exit 1 when it does not)."""
    from graphstore.server import ServerConfig, status

    with _errors():
        if _external():
            _store()
            typer.echo(f"running (external) at {os.environ['NEO4J_URI']}")
            return
        st = status(ServerConfig.default(default_home()))
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
    from records import open_run

    with _errors():
        runs = [open_run(run) for run in run_dirs]  # bad input first, before anything about the server
        if _external():
            raise GraphStoreError("bulk import writes the local server's files; it cannot import into NEO4J_URI "
                                  "(use `pathx load`, or run neo4j-admin on that server)")
        cfg = load_state(ServerConfig.default(default_home()))
        s = bulk_import(cfg, runs, _driver, overwrite=overwrite)
        typer.echo(f"{s.nodes} nodes, {s.relationships} relationships: CSV {s.csv_seconds:.1f} s, import "
                   f"{s.import_seconds:.1f} s ({s.relationships_per_second:.0f} rel/s), restart and indexes "
                   f"{s.finish_seconds:.1f} s")


@db_app.command("uri")
def db_uri() -> None:
    """The Bolt URI commands use."""
    from graphstore.server import ServerConfig, load_state

    typer.echo(os.environ.get("NEO4J_URI") or load_state(ServerConfig.default(default_home())).bolt_uri)


def _driver() -> Any:
    from graphstore.connection import open_driver, settings_from_env

    return open_driver(settings_from_env(default_home()))


def _store() -> Any:
    from graphstore.api import Store

    return Store.connect(default_home())


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
        out = default_home() / "models" / "fashion-cnn-retrained.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out)
        x, y = split("test")
        ours, committed = accuracy(model, x, y), accuracy(load_trained(TRAINED["fashion_cnn"]), x, y)
        same = "the same bytes as" if file_sha256(out) == file_sha256(WEIGHTS) else "other bytes than"
        typer.echo(f"retrained {out}: test accuracy {ours:.4f} on 10,000 images (committed weights {committed:.4f}); "
                   f"{same} {WEIGHTS.name}")


def _option_parameter(f: dataclasses.Field[Any], annotation: Any) -> inspect.Parameter:
    """One ``ExtractOptions`` field as a typer option ``--field-name``: text where the field has ``words``
    to parse it, else the field's own type; ``None`` (not given) leaves the field's default."""
    text = f.metadata["words"] is not None
    default = f.default if f.default is not dataclasses.MISSING else None
    help_text = f.metadata["help"]
    if isinstance(default, bool):
        kind: Any = bool
        value: Any = default
    else:
        kind = str | None if text else annotation
        value = None
        if default not in (None, "", ()):
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help_text = f"{help_text} (default: {shown})"
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=value,
                             annotation=Annotated[kind, typer.Option(help=help_text, show_default=False)])


def _extract(model: str, images: str, out: Path, **words: Any) -> None:
    """Extract pathways (and variants) into record files, streaming the images."""
    from extractor.launch import run_extraction
    from extractor.options import ExtractOptions

    with _errors():
        options = ExtractOptions.from_words(words)
        summary = run_extraction(model, images, out, options, default_home())
        part = options.part()
        _echo_extraction(summary, f" (shard {part.index}/{part.count})" if part.count > 1 else "")


def _extract_command() -> Any:
    """``pathx extract``: its options are ``ExtractOptions``' fields (one declaration for CLI and API)."""
    from extractor.options import ExtractOptions

    fixed = [
        inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[str, typer.Option(
            help="'demo', a trained model that ships (fashion_cnn, efficientnet_lite0), a torchvision classifier "
                 "name (resnet18, ...), FILE.py:FACTORY, package.module:FACTORY or a TorchScript file.")]),
        inspect.Parameter("images", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[str, typer.Option(
            help="demo:test, fashion-mnist:test, samples:imagenet, a folder (one sub-folder per class) or a file.")]),
        inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY,
                          annotation=Annotated[Path, typer.Option(help="Run folder for the record files.")]),
    ]
    hints = typing.get_type_hints(ExtractOptions)
    options = [_option_parameter(f, hints[f.name]) for f in dataclasses.fields(ExtractOptions)]

    def command(**kwargs: Any) -> None:
        _extract(kwargs.pop("model"), kwargs.pop("images"), kwargs.pop("out"), **kwargs)

    command.__signature__ = inspect.Signature(fixed + options)  # type: ignore[attr-defined] # read by typer
    command.__doc__ = _extract.__doc__
    return command


app.command("extract")(_extract_command())


def _echo_extraction(summary: Any, where: str = "") -> None:
    rate = summary.images / summary.seconds if summary.seconds else 0.0
    typer.echo(f"{summary.images} images, {summary.pathways} pathways, {summary.edges} edges in "
               f"{summary.seconds:.1f} s ({rate:.1f} images/s){where}; {summary.skipped_originals} originals "
               f"already done; {len(summary.bad)} unreadable images skipped")
    from graphstore.names import variant_name

    for (kind, sweep), acc in summary.accuracy().items():
        right, total = summary.correct[(kind, sweep)]
        typer.echo(f"  accuracy {variant_name(kind, sweep)}: {acc:.3f} ({right} of {total} labelled)")
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
    from records import open_run

    with _errors():
        run = open_run(run_dir)  # bad input fails before any connection is made; read once
        with _store() as store:
            s = load_run(store.driver, run, database=store.database, workers=workers)
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

    args = QueryArgs(cls=cls, cls_b=cls_b, image=image, pathway=pathway, config=config, model=model, kind=kind,
                     layer=layer, neuron=neuron, min_support=min_support, max_other=max_other, limit=limit)
    with _errors(), _store() as store:
        answer = ask(store, name, args)
        if isinstance(answer, nx.Graph) and answer.graph.get("cut_sites"):
            cut = answer.graph["cut_sites"]
            typer.echo(f"note: this pathway is cut at {len(cut)} site(s): {', '.join(cut)} (no neuron kept there "
                       "reads a neuron kept before it)", err=True)
        if isinstance(answer, nx.Graph) and answer.graph.get("edge_mode", "exact") != "exact":
            typer.echo(f"note: {answer.graph['edges_name']} (--edges {answer.graph['edge_mode']})", err=True)
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
    try:
        from pathx.report import ReportPlan, build_report
    except ModuleNotFoundError as exc:  # the demo extra's plotting library
        _fail(f"the report needs {exc.name}: pip install 'pathway-explorer[demo]'")

    with _errors():
        plan = ReportPlan(photos=photos, fashion=fashion, counts=counts, runs=runs)
        with _store() as store:
            path = build_report(store, default_home(), out, plan, progress=lambda step: typer.echo(f"report: {step}"))
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

    from extractor.demo_runs import DEMO_FASHION_IMAGES, DEMO_PHOTOS, extract_demo
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
    fresh = local and not has_database(load_state(ServerConfig.default(default_home())))
    if local and not fresh:
        step("step 1/4: Neo4j")
        db_start()
    step("step 2/4: extraction: Fashion CNN on Fashion-MNIST test images (all five methods, every variant kind), "
         "EfficientNet-Lite0 on ImageNet photos (FGSM, PGD, occluded, shifted, affine)")
    with _errors():
        done = extract_demo(out, default_home(), percentile=percentile,
                            limit=DEMO_FASHION_IMAGES if limit is None else limit,
                            photos=DEMO_PHOTOS if photos is None else photos)
        for name, summary in done.items():
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
    browser = "your NEO4J_URI server" if _external() else ServerConfig.default(default_home()).browser_url
    if serve:
        typer.echo(f"step 4/4: UI at http://127.0.0.1:{port}  |  Neo4j Browser: {browser}")
        raise typer.Exit(ui_serve.serve(port))
    typer.echo(f"done. Serve the UI with `pathx ui`; Neo4j Browser: {browser}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
