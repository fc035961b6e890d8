"""Stable ids, setting keys and the variant's sweep: made here, parsed here, nowhere else.

Ids: layer ``model id / module path#call index``, neuron ``layer id / channel``, class
``model id / class index``; a pathway setting's key ``method/selection/digest``; a pathway's
compact integer key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# variant parameters that differ image by image (a targeted attack's target, a deformation's seed,
# an occluder's position): the variant's *sweep* is its parameters without them
PER_IMAGE_KEYS = ("target", "seed", "top", "left")


def config_key(method: str, selection: str, params_json: str) -> str:
    """Short key of a pathway setting, e.g. ``mct/topk/1a2b3c4d``; equal settings share it."""
    digest = hashlib.sha256(f"{selection}:{params_json}".encode()).hexdigest()[:8]
    return f"{method}/{selection}/{digest}"


def pathway_key(pathway_id: str) -> int:
    """A pathway's compact key: the first 63 bits of the SHA-256 of its id (a non-negative long). What
    relationships that name a pathway store instead of its ~80-character id (``FLOWS_TO.pathway``); a
    unique index on ``Pathway.key`` in the store would refuse a collision."""
    return int.from_bytes(hashlib.sha256(pathway_id.encode()).digest()[:8], "big") >> 1


def layer_id(model_id: str, site_id: str) -> str:
    """Stable layer id: ``model id / module path#call index``."""
    return f"{model_id}/{site_id}"


def neuron_id(model_id: str, site_id: str, channel: int) -> str:
    """Stable neuron id: ``model id / module path#call index / channel``."""
    return f"{model_id}/{site_id}/{int(channel)}"


def class_id(model_id: str, index: int) -> str:
    """Stable class id: ``model id / class index``."""
    return f"{model_id}/{int(index)}"


@dataclass(frozen=True)
class NeuronRef:
    """A neuron id taken apart: model id, site id (``module path#call``) and channel."""

    model_id: str
    site_id: str
    channel: int

    @property
    def layer_id(self) -> str:
        return layer_id(self.model_id, self.site_id)


def parse_neuron_id(text: str) -> NeuronRef:
    """The parts of a neuron id: the last ``/`` ends the site id, the one before it the model id
    (site ids hold no ``/``). ``ValueError`` for text that is no neuron id."""
    head, sep, channel = text.rpartition("/")
    model_id, sep2, site_id = head.rpartition("/")
    if not (sep and sep2 and model_id and "#" in site_id and channel.isdigit()):
        raise ValueError(f"{text!r} is not a neuron id (model/module#call/channel)")
    return NeuronRef(model_id, site_id, int(channel))


def parse_class_id(text: str) -> tuple[str, int]:
    """(model id, class index) of a class id; ``ValueError`` otherwise."""
    model_id, sep, index = text.rpartition("/")
    if not sep or not index.isdigit():
        raise ValueError(f"{text!r} is not a class id (model/index)")
    return model_id, int(index)


def variant_sweep(kind: str, params: str | dict[str, Any]) -> str:
    """The sweep of an image: canonical JSON of its variant parameters without the
    per-image ones (``""`` for originals). Images of one attack strength share it."""
    if kind == "original":
        return ""
    values = json.loads(params or "{}") if isinstance(params, str) else params
    return json.dumps({k: v for k, v in values.items() if k not in PER_IMAGE_KEYS}, sort_keys=True)
