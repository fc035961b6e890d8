"""Torch-free records: the contract between extraction and storage.

``extractor`` writes records and ``graphstore`` reads them; neither rebuilds what a record
already says. This package owns the record types (:mod:`records.types`), the id formats and
their one parser and the variant's sweep (:mod:`records.ids`), run folders in Parquet
(:mod:`records.io`), exemplar rows (:mod:`records.exemplars`), the networkx view
(:mod:`records.graph`) and per-layer overlap (:mod:`records.overlap`). Only numpy, pyarrow and
networkx are used, so the graph store reads records on a machine without torch.
"""

from records.exemplars import EXEMPLAR_KINDS, exemplar_digest, merge_exemplar_rows, read_exemplars
from records.graph import pathway_to_networkx
from records.ids import (
    PER_IMAGE_KEYS,
    NeuronRef,
    class_id,
    config_key,
    layer_id,
    neuron_id,
    parse_class_id,
    parse_neuron_id,
    pathway_key,
    variant_sweep,
)
from records.io import (
    EXEMPLARS,
    MANIFEST,
    SHARDS,
    RunFolder,
    RunPart,
    RunStatus,
    RunWriter,
    Shard,
    iter_parts,
    open_run,
    part_dirs,
    read_manifest,
    read_run,
    require_complete,
    run_status,
)
from records.overlap import LayerOverlap, jaccard, layer_overlaps
from records.types import (
    SCHEMA_VERSION,
    ExemplarRows,
    ImageRecord,
    Manifest,
    ModelInfo,
    PathwayRecord,
    RecordsFormatError,
    SiteInfo,
    logit_ratio,
)

__all__ = [
    "EXEMPLARS", "EXEMPLAR_KINDS", "MANIFEST", "PER_IMAGE_KEYS", "SCHEMA_VERSION", "SHARDS", "ExemplarRows",
    "ImageRecord", "LayerOverlap", "Manifest", "ModelInfo", "NeuronRef", "PathwayRecord", "RecordsFormatError",
    "RunFolder", "RunPart", "RunStatus", "RunWriter", "Shard", "SiteInfo", "class_id", "config_key", "exemplar_digest",
    "iter_parts",
    "jaccard", "layer_id", "layer_overlaps", "logit_ratio", "merge_exemplar_rows", "neuron_id", "open_run",
    "parse_class_id", "parse_neuron_id", "part_dirs", "pathway_key", "pathway_to_networkx", "read_exemplars",
    "read_manifest", "read_run", "require_complete", "run_status", "variant_sweep",
]
