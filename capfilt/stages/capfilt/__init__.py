"""CapFilt on Ray Data: caption web images, score every text with ITM, keep what matches.

The stream, one way::

    shard list ──► ReadAndDecode (CPU tasks) ──► CapFiltWorker (actor pool, GPU or CPU) ──► driver
                   read a shard, split off bad     K captions per captioner, one vision      groups rows
                   rows, decode + resize to uint8  pass per filter for all texts, keep       by shard, writes
                                                   policy                                    whole shards

Why one fused actor instead of a captioner pool feeding a filter pool: the resized pixels would cross
the object store twice, the two pools would each need their own accelerator share and Ray Data does
not pipeline two GPU stages well; fused, an image is normalised once and both models sit on one
device with predictable memory.

Every input row leaves the worker as exactly one result row (``outcome`` kept / filtered / rejected)
carrying its texts, scores and decisions; the driver explodes results into ``pairs/`` and
``rejects/`` and commits whole input shards (see :mod:`capfilt.data.output`), so counts reconcile
exactly and a resumed run redoes only shards that no commit covers. A shard that cannot be read at
all is recorded in the manifest with its error instead of failing the run.

Synthetic captions depend only on (seed, key, round, caption index), given the weights, device and dtype
(see :mod:`capfilt.inference.captioner`): on CPU in float32 outputs do not depend on batch size, actor
count or restarts; on a GPU, in bf16 above all, kernels picked by batch shape round logits differently in
the last bits, so batch composition can flip a rare token (and move an ITM score near the threshold).

The package keeps those parts apart, as the stream runs:

- :mod:`~capfilt.stages.capfilt.schemas`: the shared constants and the Arrow schemas of the rows between the parts;
- :mod:`~capfilt.stages.capfilt.read`: CPU side, read a shard, split off bad rows, decode and resize;
- :mod:`~capfilt.stages.capfilt.worker`: accelerator side, caption, score, decide (``CapFiltWorker``);
- :mod:`~capfilt.stages.capfilt.assemble`: driver side, whole shards in, committed Parquet out;
- :mod:`~capfilt.stages.capfilt.run`: orchestration, plan the shards, run the Ray Data stream, write the manifest.
"""

from capfilt.stages.capfilt.assemble import ReadyShard, ShardAssembler, explode, shard_counts
from capfilt.stages.capfilt.read import NORMALISED_COLUMNS, ReadAndDecode, ShardTask, binary_rows, resize_uint8
from capfilt.stages.capfilt.run import (
    InputReadError,
    actor_pool,
    build_manifest,
    fingerprint,
    image_settings,
    plan,
    provenance_of,
    run_capfilt,
)
from capfilt.stages.capfilt.schemas import (
    DECODED_SCHEMA,
    FILTERED,
    HUMAN,
    KEPT,
    MARKER_ROW,
    PAIRS_SCHEMA,
    REJECTED,
    REJECTS_SCHEMA,
    RESULT_SCHEMA,
    SYNTHETIC,
    WEB,
)
from capfilt.stages.capfilt.worker import (
    PASSED_THROUGH,
    CapFiltWorker,
    decide,
    model_id,
    pixel_array,
    resolve_device,
    sampling_label,
)

__all__ = [
    "CapFiltWorker",
    "InputReadError",
    "DECODED_SCHEMA",
    "FILTERED",
    "HUMAN",
    "KEPT",
    "MARKER_ROW",
    "NORMALISED_COLUMNS",
    "PAIRS_SCHEMA",
    "PASSED_THROUGH",
    "REJECTED",
    "REJECTS_SCHEMA",
    "RESULT_SCHEMA",
    "ReadAndDecode",
    "ReadyShard",
    "SYNTHETIC",
    "ShardAssembler",
    "ShardTask",
    "WEB",
    "actor_pool",
    "binary_rows",
    "build_manifest",
    "decide",
    "explode",
    "fingerprint",
    "image_settings",
    "model_id",
    "pixel_array",
    "plan",
    "provenance_of",
    "resize_uint8",
    "resolve_device",
    "run_capfilt",
    "sampling_label",
    "shard_counts",
]
