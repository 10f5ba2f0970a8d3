"""UGData: street-level images anchored to a spatial graph, with spatial captions and paths.

Builds the dataset of UrbanGraphEmbeddings (arXiv 2602.08342, method 3 of DESIGN.md) for any
data root in Stadsbeeld's formats, without torch and without any external API:

- a **spatial graph** (:class:`SpatialGraph`): the street network of ``graph/streets.gpkg``
  (undirected, one edge per node pair) with edge features length, bearing (degrees, 0 = north,
  clockwise), dx and dy (metres, RD New); every grid cell and every image is anchored to its
  nearest street node (KD-tree);
- **spatial context captions** (:class:`TemplateCaptioner`, or any :class:`Captioner`): buurt
  and district, distance and 8-point direction to the nearest landmarks, street connectivity,
  water / park share, street density and Flickr photo density within
  :data:`CONTEXT_RADIUS_M`, camera heading and capture year, as varied sentences picked by a
  seeded RNG per sample;
- **spatial reasoning paths** (:func:`reasoning_path`): 1 to 3 hop walks on the street graph,
  each step with its distance and direction, as a question with its answer;
- **exports** in the layout of the paper's public code, a reader that checks it, and a split
  that holds out whole districts (the benchmark's held-out cities).

Layout (source: the README of the paper's repository, github.com/Jaygagaga/UGE, sections
"Stage 1/Stage 2: Dataset Format", and its ms-swift fork ``swift/llm/dataset/preprocessor/
core.py``, whose standard keys are ``messages``, ``images``, ``graphs``, their ``positive_``
and ``negative_`` variants and ``label``). An output folder holds:

- ``train.jsonl`` (and ``heldout.jsonl`` when a district is held out): one sample a line,

  - ``messages``: the query, ``[{"role": "user", "content": "<image> instruction"}]``;
    stage-2 queries start with ``<graph><image>``, reasoning queries carry the question;
  - ``positive_messages``: a list of message lists, ``[[{"role": "user", "content": text}]]``,
    the caption or the answer;
  - ``images``: image paths, one per ``<image>`` tag, relative to the output folder (the
    paper's loader resolves relative paths from the working directory or ``ROOT_IMAGE_DIR``:
    run it from the output folder);
  - ``graphs``: graph JSON paths relative to the output folder, one per ``<graph>`` tag,
    empty for stage-1 samples;
  - ``pair_type``: ``stage1_image_only`` (image -> caption), ``stage1_spatial_reasoning``
    (image + path question -> answer) or ``stage2_image_graph`` (graph + image -> caption);
  - ``label``: always 1 (a positive pair; negatives are the other samples of a batch);
  - ``meta``: our own provenance, ignored by the paper's loader (it keeps standard keys only):
    ``sample_id``, ``task`` (caption / reasoning), ``image_id``, ``source``, ``cell_id``,
    ``node_id`` (anchor street node), ``x``, ``y`` (RD New), ``buurt``, ``district``,
    ``districts`` (every district the sample touches: image, graph nodes, path nodes; the
    held-out split reads it), ``landmark`` (nearest: name, distance_m, bearing_deg,
    direction) and, for reasoning samples, ``question_kind``, ``path`` (node ids), ``steps``
    (length_m, bearing_deg, dx_m, dy_m, direction) and ``answer`` (the end node's node_id,
    buurt, district, and the fact asked for).

- ``graphs/<node_id>.json``: the ``hops``-hop street subgraph around an anchor node (shared by
  every image anchored there): ``center_node`` (a node id), ``nodes`` (``node_id``; ``coords``
  = [lon, lat] WGS84, as the paper's spatial encoder reads them; ``xy`` = [x, y] RD New
  metres; ``node_text`` in the paper's ``Category: ..., Neighborhood: ..., District: ...,
  Coordinates: (lon, lat)`` style; ``degree``; ``hop`` from the centre) and ``edges``
  (``source``, ``target``, ``length_m``, ``bearing_deg``, ``dx_m``, ``dy_m`` from source to
  target), plus ``crs`` of ``xy``.
- ``ugdata.json``: the manifest (layout version, data root, seed, options, counts, timings).

Differences from the paper's data, on purpose: graphs are JSON files as the README documents
(the fork's loader reads NetworkX pickles, ``to_networkx`` converts); the image is not inserted
as a graph node, so one graph file serves all images at a node; captions come from templates,
not from a hosted VLM (plug a local one in through :class:`Captioner`).

Modules: :mod:`~core.ugdata.records` (file names, pair types, the sample and graph records),
:mod:`~core.ugdata.geometry` (bearings, compass words, edge features, the keyed RNG),
:mod:`~core.ugdata.graph` (the street graph, anchoring, subgraphs), :mod:`~core.ugdata.context`
(places, landmarks, water and parks, densities), :mod:`~core.ugdata.captions`,
:mod:`~core.ugdata.paths` (reasoning paths), :mod:`~core.ugdata.io` (writing and reading the
files) and :mod:`~core.ugdata.build` (samples of a city, the held-out split, a whole folder).
Import from the package: ``from core.ugdata import read_ugdata``.
"""

from __future__ import annotations

from core.ugdata.build import (
    DistrictSplit,
    UGBuild,
    build_samples,
    build_ugdata,
    graph_record,
    select_images,
    split_by_district,
)
from core.ugdata.captions import (
    Captioner,
    TemplateCaptioner,
)
from core.ugdata.context import (
    CONTEXT_RADIUS_M,
    MAX_LANDMARK_M,
    CityContext,
    LandmarkFact,
    PlaceFacts,
    ShareRaster,
    load_city,
    nearest_landmarks,
)
from core.ugdata.geometry import (
    COMPASS,
    KeyedRng,
    bearing_deg,
    compass,
    edge_features,
    format_distance,
)
from core.ugdata.graph import (
    SpatialGraph,
    SubGraph,
    read_streets,
)
from core.ugdata.io import (
    UGData,
    read_graph,
    read_samples,
    read_ugdata,
    sample_from_json,
    write_graph,
    write_samples,
)
from core.ugdata.paths import (
    QUESTION_KINDS,
    ReasoningPath,
    random_walk,
    reasoning_path,
)
from core.ugdata.records import (
    GRAPH_DIR,
    HELDOUT_FILE,
    INSTRUCTIONS,
    LAYOUT_VERSION,
    MANIFEST,
    PAIR_CAPTION,
    PAIR_GRAPH,
    PAIR_REASONING,
    PAIR_TYPES,
    TRAIN_FILE,
    GraphRecord,
    UGDataFormatError,
    UGSample,
    graph_file_name,
    node_text,
    to_networkx,
)

__all__ = [
    "COMPASS",
    "CONTEXT_RADIUS_M",
    "Captioner",
    "CityContext",
    "DistrictSplit",
    "GRAPH_DIR",
    "GraphRecord",
    "HELDOUT_FILE",
    "INSTRUCTIONS",
    "KeyedRng",
    "LAYOUT_VERSION",
    "LandmarkFact",
    "MANIFEST",
    "MAX_LANDMARK_M",
    "PAIR_CAPTION",
    "PAIR_GRAPH",
    "PAIR_REASONING",
    "PAIR_TYPES",
    "PlaceFacts",
    "QUESTION_KINDS",
    "ReasoningPath",
    "ShareRaster",
    "SpatialGraph",
    "SubGraph",
    "TRAIN_FILE",
    "TemplateCaptioner",
    "UGBuild",
    "UGData",
    "UGDataFormatError",
    "UGSample",
    "bearing_deg",
    "build_samples",
    "build_ugdata",
    "compass",
    "edge_features",
    "format_distance",
    "graph_file_name",
    "graph_record",
    "load_city",
    "nearest_landmarks",
    "node_text",
    "random_walk",
    "read_graph",
    "read_samples",
    "read_streets",
    "read_ugdata",
    "reasoning_path",
    "sample_from_json",
    "select_images",
    "split_by_district",
    "to_networkx",
    "write_graph",
    "write_samples",
]
