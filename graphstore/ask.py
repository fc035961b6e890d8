"""Named queries by name, for the command line (``pathx query NAME``): one table from a query name and
its arguments to the ``Store`` method that answers it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graphstore.errors import NotFound

if TYPE_CHECKING:  # the CLI reads QUERY_NAMES for its help at every start: no driver, pandas or numpy then
    from graphstore.api import Store


@dataclass(kw_only=True, frozen=True)
class QueryArgs:
    """What a named query may be given; ``None`` picks the store's first model and most common setting."""

    cls: str | None = None  # a class index, name or id
    cls_b: str | None = None
    image: str | None = None
    pathway: str | None = None
    config: str | None = None
    model: str | None = None
    kind: str | None = None
    layer: str | None = None
    neuron: str | None = None
    min_support: float = 0.5
    max_other: float = 0.2
    limit: int = 20


def resolve_class(store: Store, model_id: str, value: str | None) -> str:
    """A class given by id, name or index -> its id (``NotFound`` for none or an unknown one)."""
    if value is None:
        raise NotFound("this query needs --class")
    for c in store.classes(model_id):
        if value in (c.id, c.name, str(c.index)):
            return str(c.id)
    raise NotFound(f"unknown class {value!r}")


@dataclass(kw_only=True, frozen=True)
class _Asked:
    store: Store
    name: str
    args: QueryArgs
    model: str
    config: str

    def cls(self, value: str | None) -> str:
        return resolve_class(self.store, self.model, value)

    def need(self, value: str | None, flag: str) -> str:
        if not value:
            raise NotFound(f"query {self.name} needs {flag}")
        return value


_QUERIES: dict[str, Callable[[_Asked], Any]] = {
    "summary": lambda q: q.store.summary(),
    "configs": lambda q: q.store.configs(q.model),
    "classes": lambda q: q.store.classes(q.model),
    "accuracy": lambda q: {"by_class": q.store.accuracy_by_class(q.model),
                           "by_variant": q.store.accuracy_by_variant(q.model)},
    "top-neurons": lambda q: q.store.top_neurons(q.cls(q.args.cls), q.config, q.args.layer, q.args.limit),
    "shared": lambda q: q.store.shared_pathways(q.cls(q.args.cls), q.cls(q.args.cls_b), q.config,
                                                q.args.min_support),
    "similarity": lambda q: q.store.similarity_matrix(q.model, q.config, q.args.min_support),
    "signature": lambda q: q.store.class_signature(q.cls(q.args.cls), q.config, q.args.min_support,
                                                   q.args.max_other),
    "shift": lambda q: q.store.adversarial_shift(q.need(q.args.image, "--image"), q.config),
    "hijacked": lambda q: q.store.hijacked_neurons(q.model, q.config, q.need(q.args.kind, "--kind"), None,
                                                   q.args.limit),
    "counts": lambda q: q.store.pathway_counts(q.config),
    "similar": lambda q: q.store.similar_images(q.need(q.args.image, "--image"), q.config, q.args.limit,
                                                q.args.kind),
    "agreement": lambda q: q.store.method_agreement(q.need(q.args.image, "--image")),
    "pathway": lambda q: q.store.pathway_graph(q.need(q.args.pathway, "--pathway")),
    "neuron": lambda q: q.store.neuron_card(q.need(q.args.neuron, "--neuron"), q.config),
}
QUERY_NAMES = tuple(_QUERIES)


def ask(store: Store, name: str, args: QueryArgs) -> Any:
    """The answer of the named query ``name`` (one of ``QUERY_NAMES``): results, or a ``networkx`` graph
    for ``pathway``; ``NotFound`` in one line for an unknown name or a missing argument."""
    if name not in _QUERIES:
        raise NotFound(f"unknown query {name!r}; choose from {', '.join(QUERY_NAMES)}")
    model = args.model or store.default_model()
    return _QUERIES[name](_Asked(store=store, name=name, args=args, model=model,
                                 config=args.config or store.default_config(model)))
