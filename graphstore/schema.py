"""The graph's schema, described once: labels, relationship types, their properties and types, keys, indexes.

Everything else is made from this module or tested against it:

- ``graphstore.queries.SCHEMA`` (the constraint and index statements) is built from ``INDEXES``;
- the bulk importer's CSV headers take their property names and types from ``NODES``/``RELATIONSHIPS``;
- README's schema block and the console's schema text are ``schema_text()`` (``python -m graphstore.schema``
  prints it; a test compares README with it);
- a test loads a run with every method and variant kind (through the loader and through the bulk importer)
  and checks the store holds exactly these labels, relationship types, properties and types.

Types are the bulk importer's names (``string``, ``long``, ``double``, ``boolean``, ``byte[]``,
``long[]``, ``double[]``). No Cypher here.
"""

from __future__ import annotations

import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

SIGNATURE_DIMENSIONS = 128  # Pathway.signature: the neuron set as a random +-1 projection (cosine ~ overlap)
# The store's format, on every Model node: a load refuses a store written in another (older) one. 1: pathways
# keyed by a compact integer; 2: a variant's parameters without per-image ones are its `sweep` (was `setting`);
# 3: `Pathway.saliency` holds the map's float32 bytes (as the records do), not a list of doubles: half the size;
# 4: float16 bytes of the map over its peak magnitude (`saliency_scale`): half again; `signature` as float32;
# 5: `ClassStat` counts each class's pathways and `CLASS_FLOW` holds every edge of a class (was: support >= 0.05),
# so a load adds its pathways to the class aggregates instead of recounting the class; `CLASS_FLOW` names its
# class only (`class_id` starts with the model's id).
STORE_FORMAT = 5

# bulk importer's type names -> the names ``db.schema.nodeTypeProperties()`` reports
STORED_TYPE = {"string": "String", "long": "Long", "double": "Double", "boolean": "Boolean", "byte[]": "ByteArray",
               "long[]": "LongArray", "double[]": "DoubleArray", "float[]": "FloatArray", "string[]": "StringArray"}


@dataclass(frozen=True)
class Prop:
    """One property: ``optional`` ones are set on some nodes or relationships only (said in ``note``)."""

    name: str
    type: str
    optional: bool = False


def _props(text: str) -> tuple[Prop, ...]:
    """``"id:string source:string eps?:double"`` -> props (``?``: optional)."""
    out = []
    for item in text.split():
        name, type_ = item.split(":", 1)
        out.append(Prop(name.rstrip("?"), type_, name.endswith("?")))
    return tuple(out)


@dataclass(kw_only=True, frozen=True)
class Node:
    label: str
    props: tuple[Prop, ...]
    note: str = ""
    aggregate: bool = False  # not read from records: refreshed in Cypher after a load, computed for an import

    def types(self, skip: tuple[str, ...] = ("id",)) -> dict[str, str]:
        """Property name -> type, without ``skip`` (the bulk importer's ID column)."""
        return {p.name: p.type for p in self.props if p.name not in skip}


@dataclass(kw_only=True, frozen=True)
class Rel:
    type: str
    start: str
    end: str
    props: tuple[Prop, ...] = ()
    note: str = ""
    aggregate: bool = False

    def types(self) -> dict[str, str]:
        return {p.name: p.type for p in self.props}


@dataclass(kw_only=True, frozen=True)
class Index:
    """A uniqueness constraint (``unique``), a range index or a vector index on a label or relationship type."""

    name: str
    kind: str  # unique | range | vector
    target: str  # a label, or a relationship type when ``relationship``
    props: tuple[str, ...]
    relationship: bool = False
    dimensions: int = 0  # vector indexes
    similarity: str = ""
    # vector indexes: Neo4j's default also keeps an int8 copy of every vector (a fifth of the index on disk); the
    # signature already only fetches candidates for an exact count, so its index keeps float32 alone
    quantized: bool = False


NODES: tuple[Node, ...] = (
    Node(
        label="Model",
        props=_props(
            "id:string arch:string title:string num_classes:long input_shape:long[] aggregated_pathways:long "
            "store_format:long exemplar_runs?:string[]"
        ),
        note="aggregated_pathways: how many pathways the aggregates were last computed over; store_format: "
        "graphstore.schema.STORE_FORMAT when written (a load refuses a store of another format); exemplar_runs: "
        "digests of the runs whose exemplars were merged (a repeated load skips them)",
    ),
    Node(
        label="Layer",
        props=_props(
            "id:string model_id:string site:string module_path:string call_index:long kind:string "
            "index:long channels:long shape:long[] layout:string depth:long"
        ),
        note="one per site (module path, call index); depth: sites before it on the longest path from the input",
    ),
    Node(
        label="Neuron",
        props=_props("id:string model_id:string layer_id:string site:string layer_index:long depth:long channel:long"),
    ),
    Node(label="Class", props=_props("id:string model_id:string index:long name:string")),
    Node(
        label="Image",
        props=_props(
            "id:string model_id:string source:string kind:string params:string sweep?:string "
            "label:long predicted:long prob:double probs:double[] png:byte[] variant_of?:string"
        ),
        note="variant_of and sweep (the variant's parameters without per-image ones) on variants",
    ),
    Node(
        label="Pathway",
        props=_props(
            "id:string key:long image_id:string model_id:string method:string selection:string params:string "
            "config:string target:long logit_full:double logit_masked:double logit_ratio:double size:long "
            "dead_fraction:double saliency:byte[] saliency_scale:double saliency_shape:long[] gaps:double[] "
            "layer_sizes:long[] layer_mass:double[] "
            "signature?:float[] original_pathway?:string layer_jaccard?:double[] corr_prec_overlap?:double "
            "corr_prec_jaccard?:double pixels?:double chains?:double pixel_chains?:string cut_sites?:string"
        ),
        note="saliency: the Pathway Gradient map over saliency_scale (its largest magnitude) as float16 "
        "little-endian bytes, shape saliency_shape (numpy: np.frombuffer(saliency, '<f2').reshape(saliency_shape) "
        "* saliency_scale; three significant digits); signature on non-empty pathways; "
        "original_pathway, layer_jaccard on variants' pathways; "
        "corr_prec_* on resampling pathways; pixels, chains, pixel_chains on pixel pathways; cut_sites (JSON "
        "list of site ids) where the selection is cut: no kept neuron there reads a kept neuron before it",
    ),
    Node(
        label="VariantStat",
        props=_props(
            "model_id:string config:string kind:string sweep:string label:long pairs:long "
            "changed:long jaccard_sum:double[]"
        ),
        aggregate=True,
    ),
    Node(
        label="ClassStat",
        props=_props("model_id:string config:string class_id:string pathways:long"),
        note="how many of the setting's original-image pathways explain the class (the supports' denominator)",
        aggregate=True,
    ),
    Node(
        label="CountStat",
        props=_props(
            "model_id:string config:string kind:string sweep?:string pathways:long "
            "totals:long[] mass:double[] nonzero:long[]"
        ),
        note="sweep on variants' kinds, like Image.sweep",
        aggregate=True,
    ),
)

RELATIONSHIPS: tuple[Rel, ...] = (
    Rel(type="HAS_LAYER", start="Model", end="Layer"),
    Rel(type="FEEDS", start="Layer", end="Layer", note="the site graph: a layer's direct predecessors"),
    Rel(type="HAS_NEURON", start="Layer", end="Neuron"),
    Rel(type="HAS_CLASS", start="Model", end="Class"),
    Rel(type="LABELED_AS", start="Image", end="Class"),
    Rel(type="PREDICTED_AS", start="Image", end="Class", props=_props("prob:double logit:double")),
    Rel(
        type="VARIANT_OF",
        start="Image",
        end="Image",
        props=_props("kind:string params:string sweep:string eps?:double steps?:long targeted?:boolean target?:long"),
        note="eps on attacks, steps on PGD",
    ),
    Rel(type="FOR_IMAGE", start="Pathway", end="Image"),
    Rel(type="EXPLAINS", start="Pathway", end="Class"),
    Rel(
        type="INCLUDES",
        start="Pathway",
        end="Neuron",
        props=_props("contribution:double score:double rank:long elements:long dead:boolean gained?:boolean"),
        note="gained on variants' pathways",
    ),
    Rel(
        type="FLOWS_TO",
        start="Neuron",
        end="Neuron",
        props=_props("pathway:long weight:double"),
        note="pathway: the pathway's key (Pathway.key), a long, not its id string: 8 bytes inline per edge",
    ),
    Rel(
        type="EXEMPLAR",
        start="Neuron",
        end="Image",
        props=_props("kind:string rank:long value:double position:long[] box:long[]"),
        note="top-N original images per neuron; kind activation or contribution",
    ),
    Rel(
        type="USES",
        start="Class",
        end="Neuron",
        props=_props("config:string support:double mean_contribution:double pathways:long"),
        aggregate=True,
    ),
    Rel(
        type="CLASS_FLOW",
        start="Neuron",
        end="Neuron",
        props=_props("class_id:string config:string support:double mean_weight:double pathways:long"),
        note="every edge of the class's original pathways (filter on support)",
        aggregate=True,
    ),
    Rel(type="GAINED", start="VariantStat", end="Neuron", props=_props("count:long"), aggregate=True),
)

INDEXES: tuple[Index, ...] = (
    *(
        Index(name=f"{label.lower()}_id", kind="unique", target=label, props=("id",))
        for label in ("Model", "Layer", "Neuron", "Class", "Image", "Pathway")
    ),
    Index(name="pathway_key", kind="unique", target="Pathway", props=("key",)),
    Index(name="pathway_config", kind="range", target="Pathway", props=("config",)),
    Index(name="pathway_image", kind="range", target="Pathway", props=("image_id",)),
    Index(name="pathway_model", kind="range", target="Pathway", props=("model_id",)),
    Index(name="image_kind", kind="range", target="Image", props=("kind",)),
    Index(name="image_model", kind="range", target="Image", props=("model_id",)),
    Index(name="neuron_layer", kind="range", target="Neuron", props=("layer_id",)),
    Index(name="flows_pathway", kind="range", target="FLOWS_TO", props=("pathway",), relationship=True),
    Index(name="uses_config", kind="range", target="USES", props=("config",), relationship=True),
    Index(name="class_flow", kind="range", target="CLASS_FLOW", props=("class_id", "config"), relationship=True),
    Index(name="class_stat", kind="range", target="ClassStat", props=("class_id", "config")),
    Index(name="count_stat", kind="range", target="CountStat", props=("config",)),
    Index(name="variant_stat", kind="range", target="VariantStat", props=("model_id", "config")),
    # approximate nearest pathways by neuron set (graphstore.rows.signature)
    Index(
        name="pathway_signature",
        kind="vector",
        target="Pathway",
        props=("signature",),
        dimensions=SIGNATURE_DIMENSIONS,
        similarity="cosine",
    ),
)


def node(label: str) -> Node:
    return next(n for n in NODES if n.label == label)


def relationship(type_: str) -> Rel:
    return next(r for r in RELATIONSHIPS if r.type == type_)


@dataclass(frozen=True)
class StoredSchema:
    """A schema in the form a store reports it: label -> property -> type (``String``, ``LongArray``, ...),
    relationship type -> property -> type (``{}`` for none), index name -> (kind, label or type, properties)
    with kind ``unique`` (a constraint's index), ``range`` or ``vector``."""

    nodes: dict[str, dict[str, str]]
    relationships: dict[str, dict[str, str]]
    indexes: dict[str, tuple[str, str, tuple[str, ...]]]

    @classmethod
    def read(cls, node_rows: list[dict[str, Any]], rel_rows: list[dict[str, Any]],
             index_rows: list[dict[str, Any]]) -> StoredSchema:
        """From the rows of ``STORED_NODE_PROPERTIES``, ``STORED_RELATIONSHIP_PROPERTIES`` and
        ``STORED_INDEXES`` (token lookup indexes left out)."""
        nodes: dict[str, dict[str, str]] = defaultdict(dict)
        rels: dict[str, dict[str, str]] = defaultdict(dict)
        for r in node_rows:
            for label in r["labels"]:
                if r["property"] is not None:
                    nodes[label][r["property"]] = "|".join(r["types"])
        for r in rel_rows:
            props = rels[r["type"].lstrip(":").strip("`")]
            if r["property"] is not None:
                props[r["property"]] = "|".join(r["types"])
        indexes = {r["name"]: ("unique" if r["constraint"] else r["type"].lower(), r["target"][0],
                               tuple(r["properties"])) for r in index_rows if r["type"] != "LOOKUP"}
        return cls(dict(nodes), dict(rels), indexes)


def stored_form() -> StoredSchema:
    """What a store holding every kind of record must report (``Store.stored_schema()``)."""
    return StoredSchema({n.label: {p.name: STORED_TYPE[p.type] for p in n.props} for n in NODES},
                        {r.type: {p.name: STORED_TYPE[p.type] for p in r.props} for r in RELATIONSHIPS},
                        {i.name: (i.kind, i.target, i.props) for i in INDEXES})


def _wrap(head: str, names: list[str], tail: str, width: int = 110) -> list[str]:
    """``head{a, b, ...}tail`` broken into lines of at most ``width`` characters."""
    lines, line = [], head + "{"
    indent = " " * len(line)
    for i, name in enumerate(names):
        piece = name + (", " if i < len(names) - 1 else "}")
        if len(line) + len(piece.rstrip()) > width and line.strip() not in ("", head.strip() + "{"):
            lines.append(line.rstrip())
            line = indent
        line += piece
    lines.append(line + tail)
    return lines


def _names(props: tuple[Prop, ...]) -> list[str]:
    return [p.name + ("?" if p.optional else "") for p in props]


def _noted(lines: list[str], note: str) -> list[str]:
    return [*textwrap.wrap(note, 110, initial_indent="// ", subsequent_indent="// "), *lines]


def schema_text() -> str:
    """The schema as a Cypher-like picture (README's block, the console's schema panel)."""
    out = ["// nodes (? = on some nodes only)"]
    for n in (n for n in NODES if not n.aggregate):
        out += _noted(_wrap(f"(:{n.label} ", _names(n.props), ")"), n.note)
    out.append("// relationships")
    for r in (r for r in RELATIONSHIPS if not r.aggregate):
        head = f"(:{r.start})-[:{r.type}"
        lines = _wrap(head + " ", _names(r.props), f"]->(:{r.end})") if r.props else [f"{head}]->(:{r.end})"]
        out += _noted(lines, r.note)
    out.append("// aggregates: a load adds its pathways to them in Cypher, an import computes them in pandas")
    for n in (n for n in NODES if n.aggregate):
        out += _noted(_wrap(f"(:{n.label} ", _names(n.props), ")"), n.note)
    for r in (r for r in RELATIONSHIPS if r.aggregate):
        out += _noted(_wrap(f"(:{r.start})-[:{r.type} ", _names(r.props), f"]->(:{r.end})"), r.note)
    out.append("// keys and indexes")
    unique = [f"{i.target}.{i.props[0]}" for i in INDEXES if i.kind == "unique"]
    out += _wrap("unique ", unique, "")
    ranged = [f"{i.target}({', '.join(i.props)})" for i in INDEXES if i.kind == "range"]
    out += _wrap("range indexes ", ranged, "")
    for i in (i for i in INDEXES if i.kind == "vector"):
        out.append(f"vector index {i.name} on {i.target}.{i.props[0]} ({i.dimensions} dimensions, {i.similarity}"
                   f"{'' if i.quantized else ', not quantized'})")
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # pragma: no cover - prints README's schema block
    sys.stdout.write(schema_text())
