"""The generated world: scenes of shapes whose truth is known, rendered and captioned as web data.

It exists so CapFilt can be measured: the filter's noise detection against ``gt_noise_type``, the
captioner's accuracy with :func:`check_caption`, and retrieval on a held-out split. Modules:
``scene`` (what is in an image), ``render`` (drawing it), ``lexicon`` (the words), ``captions``
(web and human phrasing, web noise), ``checker`` (is a caption true of a scene), ``writer``
(img2dataset-layout Parquet shards).
"""

from capfilt.data.world.captions import NOISE_TYPES, human_captions, web_pair
from capfilt.data.world.checker import CaptionParseError, CheckResult, Claims, check_caption, parse_caption
from capfilt.data.world.render import encode_jpeg, render
from capfilt.data.world.scene import Background, Scene, SceneObject, sample_scene
from capfilt.data.world.writer import WorldPaths, compute_key, make_rows, noise_counts, write_shard, write_world

__all__ = [
    "NOISE_TYPES",
    "Background",
    "CaptionParseError",
    "CheckResult",
    "Claims",
    "Scene",
    "SceneObject",
    "WorldPaths",
    "check_caption",
    "compute_key",
    "encode_jpeg",
    "human_captions",
    "make_rows",
    "noise_counts",
    "parse_caption",
    "render",
    "sample_scene",
    "web_pair",
    "write_shard",
    "write_world",
]
