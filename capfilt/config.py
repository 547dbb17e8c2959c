"""The pipeline schema. Every default capfilt uses lives in this file.

Each section is a strict pydantic model (unknown keys are errors that name the key), so a typo in a
pipeline YAML fails at load time instead of silently falling back to a default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Marks a field that changes how a stage runs (batching, parallelism, file sizes, logging) but not what
# it produces: a finished stage is not redone, nor a resumed one refused, when only such fields change.
RUNTIME: dict[str, Any] = {"runtime": True}


def identity(section: BaseModel) -> dict[str, Any]:
    """``section`` as JSON without its RUNTIME fields (recursively): what its results depend on."""
    out: dict[str, Any] = {}
    for name, field in type(section).model_fields.items():
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("runtime"):
            continue
        out[name] = _json(getattr(section, name))
    return out


def _json(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return identity(value)
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------------
# Model sizes
# --------------------------------------------------------------------------------------------------


class VisionConfig(Section):
    """The ViT image encoder (transformers' BlipVisionModel)."""

    image_size: int = Field(384, gt=0, description="input side in pixels; 224 pretraining, 384 fine-tuning")
    patch_size: int = Field(16, gt=0)
    width: int = Field(768, gt=0)
    layers: int = Field(12, gt=0)
    heads: int = Field(12, gt=0)
    mlp_dim: int = Field(3072, gt=0)
    # The reference ViT uses 1e-6; transformers' BlipVisionConfig defaults to 1e-5.
    layer_norm_eps: float = 1e-6

    @model_validator(mode="after")
    def _check(self) -> "VisionConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        return self


class TextConfig(Section):
    """The BERT-style text towers (transformers' BlipTextModel / BlipTextLMHeadModel)."""

    width: int = Field(768, gt=0)
    layers: int = Field(12, gt=0)
    heads: int = Field(12, gt=0)
    mlp_dim: int = Field(3072, gt=0)
    max_position_embeddings: int = Field(512, gt=0)
    # The reference trains with dropout 0.1; transformers' BlipTextConfig defaults to 0.0.
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    attention_init_gain: float = Field(
        1.0, gt=0.0,
        description="from-scratch init only: scales the attention value and output weights. BERT is post-LN, so "
        "at std 0.02 a narrow tower's attention adds ~5% to the residual and [CLS] (ITC) and the image "
        "(ITM, LM) barely reach the output; pretrained BERT never starts there, a from-scratch tower does",
    )
    cross_attention_qk_init_gain: float = Field(
        1.0, gt=0.0,
        description="from-scratch init only: scales the cross-attention query and key weights. At std 0.02 the "
        "attention logits over image tokens are ~0.05 apart: attention is uniform, the text sees the mean image "
        "and the gradient that would sharpen it is as small; ITM then sits at its 1:2 prior for hundreds of steps",
    )
    layer_norm_eps: float = 1e-12

    @model_validator(mode="after")
    def _check(self) -> "TextConfig":
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        return self


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Trains on a laptop CPU in seconds; used by the demo and the tests.
    "tiny": {
        "vision": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 3, "heads": 4, "mlp_dim": 512},
        "text": {"width": 128, "layers": 3, "heads": 4, "mlp_dim": 512, "max_position_embeddings": 64,
                 "attention_init_gain": 4.0, "cross_attention_qk_init_gain": 8.0},
        "embed_dim": 128,
        "queue_size": 1024,
    },
    # ViT-B/16 + BERT-base: the reference sizes.
    "base": {
        "vision": {"image_size": 384, "patch_size": 16, "width": 768, "layers": 12, "heads": 12, "mlp_dim": 3072},
        "text": {"width": 768, "layers": 12, "heads": 12, "mlp_dim": 3072},
    },
    # ViT-L/16 + BERT-base (BLIP's large captioner and filter).
    "large": {
        "vision": {"image_size": 384, "patch_size": 16, "width": 1024, "layers": 24, "heads": 16, "mlp_dim": 4096},
        "text": {"width": 768, "layers": 12, "heads": 12, "mlp_dim": 3072},
    },
}


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class InitConfig(Section):
    """Where MED's weights start (capfilt/models/init.py). Unset parts stay freshly initialised, and every
    training stage lists them (InitReport) in its log and its completion record.

    BLIP's pretraining starts from an ImageNet ViT (``vision``) and BERT (``text``); continued pretraining
    from a MED directory (``med``); fine-tuning a new captioner or filter on your own human pairs from
    published BLIP checkpoints (``blip_retrieval`` and/or ``blip_captioning``).
    """

    vision: str | None = Field(
        None, description="timm ViT: a timm model name (pretrained weights from its hub) or a local .safetensors / "
        ".pth timm checkpoint; re-gridded to vision.image_size",
    )
    text: str | None = Field(
        None, description="BERT-style model (hub id or directory) for the text encoder and decoder; cross-attention "
        "stays fresh. The run's tokenizer must be this model's (tokenizer.source)",
    )
    med: str | None = Field(None, description="a MED directory (save_med): continued pretraining; excludes the rest")
    blip_retrieval: str | None = Field(
        None, description="BlipForImageTextRetrieval (hub id or directory): ViT, text encoder, ITC projections, ITM head",
    )
    blip_captioning: str | None = Field(
        None, description="BlipForConditionalGeneration (hub id or directory): ViT and decoder. With blip_retrieval "
        "too, the ViT and every part the encoder and decoder share come from blip_retrieval",
    )
    revision: str | None = Field(None, description="hub revision for the hub ids above")

    @model_validator(mode="after")
    def _check(self) -> "InitConfig":
        if self.med and (self.vision or self.text or self.blip_retrieval or self.blip_captioning):
            raise ValueError("med is a whole MED: it excludes vision, text, blip_retrieval and blip_captioning")
        blip = self.blip_retrieval or self.blip_captioning
        for name in ("vision", "text"):
            if blip and getattr(self, name):
                raise ValueError(f"{name} and blip_retrieval / blip_captioning both give the {name} tower: choose one")
        return self

    @property
    def text_source(self) -> str | None:
        """The checkpoint whose vocabulary the run's tokenizer must match."""
        return self.text or self.blip_retrieval or self.blip_captioning

    def is_set(self) -> bool:
        return any(getattr(self, name) for name in ("vision", "text", "med", "blip_retrieval", "blip_captioning"))


class MedConfig(Section):
    """MED: one ViT, a text encoder (ITC, ITM) and a text decoder (LM) sharing all but self-attention."""

    preset: Literal["tiny", "base", "large"] | None = Field(
        None, description="start from a named size; keys given beside it override the preset"
    )
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    vocab_size: int | None = Field(None, gt=0, description="None: follow the tokenizer")
    embed_dim: int = Field(256, gt=0, description="ITC projection size")
    queue_size: int = Field(
        57600, ge=0,
        description="ITC momentum feature queue length; 0: in-batch negatives only. From scratch, a queue "
        "lets ITC separate this step's features from older ones instead of images from texts (see README)",
    )
    momentum: float = Field(0.995, ge=0.0, le=1.0)
    temperature_init: float = Field(0.07, gt=0.0)
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    alpha: float = Field(0.4, ge=0.0, le=1.0, description="weight of momentum-distilled ITC targets")
    alpha_rampup_steps: int = Field(0, ge=0, description="ramp alpha linearly from 0 over this many steps")
    lm_label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    init: InitConfig = Field(
        InitConfig(), description="pretrained weights the first pretraining starts from; default: none (from scratch)"
    )

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset"):
            name = data["preset"]
            if name not in MODEL_PRESETS:
                return data  # the Literal check reports it
            return _deep_merge(MODEL_PRESETS[name], data)
        return data


# --------------------------------------------------------------------------------------------------
# Captioning and filtering settings
# --------------------------------------------------------------------------------------------------


class CaptionSampling(Section):
    """How the captioner writes captions. Defaults are the BLIP CapFilt reference settings."""

    method: Literal["nucleus", "beam"] = "nucleus"
    num_captions: int = Field(
        1, ge=0, description="K captions per image (nucleus); beam returns the best K. 0 in capfilt.sampling: no "
        "synthetic captions, the filter alone (BLIP's 'filter only' ablation; no captioner is trained or loaded)",
    )
    nucleus_top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int | None = Field(50, ge=1, description="None turns top-k off (the reference inherits 50)")
    temperature: float = Field(1.0, gt=0.0)
    repetition_penalty: float = Field(1.1, ge=1.0)
    # Lengths count the prompt tokens ([DEC] + prompt), as the reference does.
    max_length: int = Field(30, ge=2)
    min_length: int = Field(10, ge=0)
    num_beams: int = Field(3, ge=1)
    prompt: str = "a picture of "
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "CaptionSampling":
        if self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} exceeds max_length {self.max_length}")
        if self.method == "beam" and self.num_captions > self.num_beams:
            raise ValueError(f"num_captions {self.num_captions} exceeds num_beams {self.num_beams}")
        return self


# The reference evaluates with beam search and no repetition penalty.
BEAM_EVAL_SAMPLING = CaptionSampling(method="beam", num_beams=3, max_length=20, min_length=5, repetition_penalty=1.0)


# --------------------------------------------------------------------------------------------------
# Data in (readers, decoding) -- capfilt/data/shards/, capfilt/data/images.py
# --------------------------------------------------------------------------------------------------

# === data sections ===

# BLIP's (CLIP's) normalisation, the same as transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ReaderConfig(Section):
    """Where input pairs are and how to read them (capfilt/data/shards/)."""

    format: Literal["parquet", "webdataset", "folder"] = Field(
        "parquet", description="img2dataset parquet, webdataset tars, or captions CSV/JSONL files beside images"
    )
    paths: str | list[str] | None = Field(
        None,
        description="files, globs and brace lists ({00000..00009}.parquet, {a,b}); local, s3://, gs://; "
        "for 'folder' the captions files",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options, e.g. {endpoint_url, key, secret} for S3"
    )
    batch_size: int = Field(256, gt=0, description="rows per record batch", json_schema_extra=RUNTIME)
    caption_column: str = "caption"
    image_column: str | None = Field(None, description="None: whichever of jpg/png/webp the shard has")
    key_column: str | None = Field("key", description="None, or absent from a shard: derive keys from file and row")
    columns: list[str] | None = Field(None, description="extra input columns to carry through; None: all")
    image_path_column: str = Field("image", description="folder: the column with image paths")
    images_root: str | None = Field(None, description="folder: base of relative image paths; None: the captions file's folder")
    webdataset_sidecar: bool = Field(
        True, description="webdataset: add the failed rows img2dataset keeps only in the {shard}.parquet beside the tar"
    )
    read_retries: int = Field(
        3, ge=0, description="retries of a shard (or folder image) whose storage fails: network, timeout, throttling",
        json_schema_extra=RUNTIME,
    )
    retry_backoff_s: float = Field(
        1.0, ge=0.0, description="seconds before the first retry; doubled for each next one", json_schema_extra=RUNTIME
    )


class ImageConfig(Section):
    """Decoding limits and model-input preprocessing (capfilt/data/images.py)."""

    # 8192 x 8192: below Pillow's own warning threshold (~89.5 M pixels), so this check is the one that fires.
    max_pixels: int = Field(8192 * 8192, gt=0, description="reject images whose header declares more pixels")
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    train_scale: tuple[float, float] = Field(
        (0.5, 1.0), description="RandomResizedCrop area range; BLIP pretraining uses (0.2, 1.0)"
    )
    hflip_p: float = Field(0.5, ge=0.0, le=1.0)
    randaugment_ops: int = Field(2, ge=0)
    randaugment_magnitude: int = Field(5, ge=0, le=10, description="of 10, as BLIP's RandomAugment(2, 5)")

    @model_validator(mode="after")
    def _check(self) -> "ImageConfig":
        low, high = self.train_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"train_scale {self.train_scale} must satisfy 0 < low <= high <= 1")
        return self


class IngestConfig(Section):
    """Download a URL list with img2dataset into Parquet shards (capfilt/stages/ingest.py)."""

    url_list: str = Field(description="a URL file or a folder of them (local, s3://, gs://)")
    input_format: Literal[
        "txt", "txt.gz", "csv", "csv.gz", "tsv", "tsv.gz", "json", "json.gz", "jsonl", "jsonl.gz", "parquet"
    ] = "csv"
    url_col: str = "url"
    caption_col: str | None = "caption"
    save_additional_columns: list[str] = Field(default_factory=list, description="input columns kept in the shards")
    output_format: Literal["parquet", "webdataset"] = "parquet"
    image_size: int = Field(384, gt=0, description="BLIP fine-tunes and captions at 384 px")
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = Field(
        "keep_ratio", description="keep_ratio: shorter side to image_size, no crop, so training can still crop"
    )
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    number_sample_per_shard: int = Field(10_000, gt=0)
    processes_count: int = Field(1, gt=0)
    thread_count: int = Field(32, gt=0)
    timeout_s: int = Field(10, gt=0)
    retries: int = Field(0, ge=0)
    min_image_size: int = Field(0, ge=0)
    max_aspect_ratio: float | None = Field(None, gt=0, description="None: no limit")
    user_agent_token: str | None = None
    disallowed_header_directives: list[str] | None = Field(
        None, description="None: img2dataset's default (honour noai, noimageai, noindex, noimageindex)"
    )


# --------------------------------------------------------------------------------------------------
# The generated world -- capfilt/data/world.py
# --------------------------------------------------------------------------------------------------

# === world sections ===


class NoiseFractions(Section):
    """Fractions of web captions per noise type; the rest (``clean``) are correct web captions.

    Counts are exact per split (largest-remainder rounding), not drawn per row.
    """

    mismatched: float = Field(0.15, ge=0.0, le=1.0, description="a correct caption of another scene")
    hard_attribute: float = Field(0.10, ge=0.0, le=1.0, description="one colour, shape or size wrong")
    hard_relation: float = Field(0.06, ge=0.0, le=1.0, description="one relation flipped (left/right, above/below)")
    boilerplate: float = Field(0.06, ge=0.0, le=1.0, description="alt-text like 'IMG_2041.jpg', 'click to enlarge'")
    truncated: float = Field(0.04, ge=0.0, le=1.0, description="a caption cut mid-phrase ('red circle left of a')")
    vague: float = Field(0.04, ge=0.0, le=1.0, description="no checkable object ('some shapes', 'abstract art')")

    @model_validator(mode="after")
    def _check(self) -> "NoiseFractions":
        total = sum(self.model_dump().values())
        if total > 1.0 + 1e-9:
            raise ValueError(f"noise fractions sum to {total:.4f}, more than 1")
        return self

    @property
    def clean(self) -> float:
        return max(0.0, 1.0 - sum(self.model_dump().values()))


class WorldConfig(Section):
    """The generated world: shapes on textured backgrounds with known truth (capfilt/data/world).

    Defaults are sized for the CPU demo (a tiny MED pretrains on them in minutes).
    """

    seed: int = Field(0, description="same config and seed give byte-identical Parquet shards")
    num_web: int = Field(4000, ge=0, description="web pairs (rows), noisy and failed rows included")
    num_human: int = Field(1000, ge=0, description="human-annotated images (COCO's role)")
    num_test: int = Field(250, ge=0, description="held-out test images for retrieval and captioning eval")
    num_labelled: int = Field(
        0, ge=0, description="images labelled with the shape classes they show and no caption: the world's ImageNet, "
        "for pretrain_vision; drawn from their own seeds, so disjoint from the other splits",
    )
    captions_per_human_image: int = Field(1, ge=1, description="human captions per human image")
    captions_per_test_image: int = Field(5, ge=1, description="reference captions per test image (COCO has 5)")
    image_size: int = Field(96, ge=32, le=1024, description="rendered side in pixels")
    jpeg_quality: int = Field(90, ge=1, le=100)
    rows_per_shard: int = Field(1000, ge=1, description="img2dataset's number_sample_per_shard")
    min_objects: int = Field(1, ge=1, le=4)
    max_objects: int = Field(3, ge=1, le=4)
    duplicate_probability: float = Field(
        0.25, ge=0.0, le=1.0, description="chance a new object repeats an earlier one's colour and shape (counts)"
    )
    noise: NoiseFractions = NoiseFractions()
    failed_rows: int = Field(4, ge=0, description="web rows kept as status failed_to_download with no bytes")
    corrupt_rows: int = Field(4, ge=0, description="web rows with status success but undecodable bytes")

    @model_validator(mode="after")
    def _check(self) -> "WorldConfig":
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects {self.min_objects} exceeds max_objects {self.max_objects}")
        if self.failed_rows + self.corrupt_rows > self.num_web:
            raise ValueError(
                f"failed_rows {self.failed_rows} + corrupt_rows {self.corrupt_rows} exceed num_web {self.num_web}"
            )
        if self.noise.hard_relation > 0 and self.max_objects < 2:
            raise ValueError("hard_relation noise needs max_objects >= 2 (a relation needs two objects)")
        return self


# --------------------------------------------------------------------------------------------------
# Training -- capfilt/data/pairs.py, capfilt/training/loop.py, capfilt/stages/{pretrain,finetune}.py
# --------------------------------------------------------------------------------------------------

# === training sections ===

PairSourceName = Literal["web", "synthetic", "human"]


class PairSource(Section):
    """Image-text pairs to train on: raw shards, or the kept pairs of a CapFilt output (capfilt/data/pairs.py)."""

    kind: Literal["shards", "capfilt"] = "shards"
    reader: ReaderConfig | None = Field(
        None, description="shards: the input shards; capfilt: how to read the shards its pairs refer to (optional)"
    )
    role: Literal["web", "human"] = Field("web", description="shards: the source recorded on their pairs")
    path: str | None = Field(None, description="capfilt: the output directory (its pairs/ table)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for path")
    sources: list[PairSourceName] | None = Field(None, description="keep pairs of these sources only; None: all")
    use_all_references: bool = Field(
        False, description="shards with a 'captions' list column (human/test): one pair per reference caption"
    )
    max_caption_words: int = Field(30, gt=0, description="pre_caption's word limit")
    max_pixels: int = Field(ImageConfig.model_fields["max_pixels"].default, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "PairSource":
        if self.kind == "shards" and self.path is not None:
            raise ValueError("path is for kind 'capfilt'; shards are given by reader.paths")
        if self.kind == "capfilt" and self.use_all_references:
            raise ValueError("use_all_references needs raw shards with a 'captions' column, not a CapFilt output")
        return self


class ExportConfig(Section):
    """A CapFilt output handed to other trainers: WebDataset tars or Parquet, images inline (capfilt/stages/export.py)."""

    format: Literal["webdataset", "parquet"] = Field(
        "webdataset", description="webdataset: img2dataset's tars with a .parquet index beside each; parquet: img2dataset's "
        "columns with the image bytes inline, plus capfilt's"
    )
    sources: list[PairSourceName] | None = Field(None, description="export pairs of these sources only; None: all")
    group_by: Literal["text", "image"] = Field(
        "text", description="text: one sample per kept text; image: one sample per image with all its kept texts "
        "(the best-scoring one as its caption)"
    )
    min_score: float | None = Field(
        None, ge=0.0, le=1.0, description="export texts with itm_prob at least this; texts without a score (human) pass"
    )
    samples_per_shard: int = Field(10000, gt=0, description="samples per output shard (img2dataset's number_sample_per_shard)")
    image_column: str = Field("jpg", description="parquet: the image bytes column (img2dataset names it by format)")
    input_storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the input shards the pairs refer to", json_schema_extra=RUNTIME
    )
    output_storage_options: dict[str, Any] = Field(default_factory=dict, json_schema_extra=RUNTIME)
    tasks_in_flight: int = Field(
        0, ge=0, description="export shards written at once; 0: one per cluster CPU", json_schema_extra=RUNTIME
    )


class TokenizerConfig(Section):
    """The run's tokenizer: trained on its captions, or an existing one (a hub id or local directory)."""

    source: str = Field("train", description="'train': WordPiece on the human + web captions; else a hub id or dir")
    revision: str | None = None
    vocab_size: int = Field(4000, gt=0, description="source 'train' only")


class TrainConfig(Section):
    """One MED training run on Ray Train (capfilt/training/loop.py). Defaults: BLIP pretraining.

    ``steps`` is the unit of training: two runs with the same steps and batch see the same number of
    pairs, which is what makes noisy and bootstrapped pretraining comparable.
    """

    steps: int = Field(1000, gt=0, description="optimiser steps")
    batch_size: int = Field(64, gt=0, description="global batch: pairs per optimiser step over all workers")
    grad_accumulation: int = Field(1, ge=1, description="micro-batches per step on each worker")
    lr: float = Field(3e-4, gt=0.0, description="peak learning rate, reached after warm-up")
    min_lr: float = Field(1e-6, ge=0.0)
    warmup_steps: int = Field(100, ge=0, description="linear from warmup_lr to lr")
    warmup_lr: float = Field(1e-6, ge=0.0)
    schedule: Literal["cosine", "step"] = Field("step", description="after warm-up: cosine to min_lr, or step decay")
    decay_rate: float = Field(0.9, gt=0.0, le=1.0, description="step: lr factor every decay_every steps")
    decay_every: int = Field(100, gt=0, description="step: steps per decay (BLIP decays once per epoch)")
    weight_decay: float = Field(0.05, ge=0.0, description="AdamW; not on biases, norms, temperature, ViT tokens")
    max_text_length: int = Field(30, ge=2, description="tokens per text, [CLS]/[SEP] included")
    objectives: list[Literal["itc", "itm", "lm"]] = Field(["itc", "itm", "lm"])
    prompt: str = Field("", description="LM: prepended to every caption; its tokens get no loss")
    alpha: float | None = Field(None, ge=0.0, le=1.0, description="ITC distillation weight; None: the model's")
    alpha_rampup_steps: int | None = Field(None, ge=0, description="None: the model's")
    image: ImageConfig = Field(
        ImageConfig(train_scale=(0.2, 1.0)),
        description="augmentation; set image.hflip_p 0 where captions say left/right (the generated world)",
    )
    image_size: int | None = Field(None, gt=0, description="train resolution; None: the model's (re-grids if set)")
    shuffle_shards: int = Field(
        8, ge=0, description="units (input shards, CapFilt pairs files) per shuffle window: each epoch takes the "
        "units in a seeded order and trains each window's pairs in a seeded permutation; their image bytes are "
        "what training holds in memory. 0: all units, one global permutation per epoch"
    )
    max_bad_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="pairs met in training that cannot be used (an image that does not "
        "decode, a shard gone or changed since the stage counted it) are counted and replaced by the next good "
        "pair of their batch; once more than this fraction of the pairs proves unusable the run stops"
    )
    checkpoint_every: int = Field(
        100, gt=0, description="steps between checkpoints (the last step always saves)", json_schema_extra=RUNTIME
    )
    keep_checkpoints: int = Field(2, ge=1, json_schema_extra=RUNTIME)
    max_restarts: int = Field(
        3, ge=0, description="a worker, decoding task or node lost mid-run: restarts from the last checkpoint",
        json_schema_extra=RUNTIME,
    )
    record_samples: bool = Field(
        False, description="audit: each rank appends the stream positions it trained at each step to "
        "samples.rank{r}.jsonl in the stage directory", json_schema_extra=RUNTIME,
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the workers: PACK fills a node first, SPREAD puts them on "
        "different nodes where it can", json_schema_extra=RUNTIME,
    )
    # RUNTIME: the data order is a function of (seed, step) alone, so a run may resume on more or fewer workers.
    workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks)", json_schema_extra=RUNTIME)
    train_in_driver: bool = Field(
        False, description="one rank in the driver's own process (Ray Train's local mode, num_workers=0): no "
        "controller or worker processes to start, about 20 s less per stage on a laptop; needs workers: 1; a crash "
        "ends the run (rerunning resumes from the last checkpoint). Decoding still runs in Ray tasks. For small "
        "runs and debugging", json_schema_extra=RUNTIME,
    )
    cpus_per_worker: float = Field(
        1.0, gt=0.0, description="Ray CPUs per worker; torch threads: this, rounded up", json_schema_extra=RUNTIME
    )
    data_cpus: float = Field(
        1.0, gt=0.0, description="CPUs per batch-decoding Ray task (leave them free of workers)", json_schema_extra=RUNTIME
    )
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="auto: when the cluster has GPUs", json_schema_extra=RUNTIME
    )
    mixed_precision: Literal["auto", "bf16", "off"] = Field(
        "auto", description="auto: bf16 autocast where the hardware multiplies bf16 (a GPU; a CPU with AVX512-BF16 "
        "or AMX, for towers at least 128 wide), fp32 elsewhere", json_schema_extra=RUNTIME
    )
    seed: int = 0
    log_every: int = Field(10, gt=0, json_schema_extra=RUNTIME)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        ranks = self.workers * self.grad_accumulation
        if self.batch_size % ranks:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of workers x grad_accumulation "
                f"({self.workers} x {self.grad_accumulation})"
            )
        if not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives must be distinct and non-empty, got {self.objectives}")
        if self.train_in_driver and self.workers != 1:
            raise ValueError(f"train_in_driver trains one rank, in the driver; workers is {self.workers}")
        if self.prompt and "lm" not in self.objectives:
            raise ValueError("prompt applies to the LM objective only")
        return self

    @property
    def micro_batch(self) -> int:
        """Pairs per forward pass on one worker."""
        return self.batch_size // (self.workers * self.grad_accumulation)


class VisionPretrainConfig(Section):
    """Pretrain the MED's ViT as an image classifier before it sees a caption, as BLIP's ViT is pretrained on
    ImageNet (capfilt/stages/pretrain_vision.py). The result is a timm checkpoint that the first MED
    pretraining starts from, through the same path as ``model.init.vision``. The architecture is
    ``model.vision``'s. Meant for small labelled sets (the decoded images are held in memory); for
    ImageNet itself, name a timm model in ``model.init.vision`` instead.
    """

    data: ReaderConfig | None = Field(None, description="labelled images; None: the synth stage's labelled split")
    label_column: str = Field(
        "labels", description="a string column (one class per image) or a list column (every class the image shows)"
    )
    holdout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="images held out to report accuracy on")
    pool: Literal["max", "avg", "token"] = Field(
        "max", description="what the classifier head reads. max: the feature-wise max over the patch tokens, so "
        "each patch token must show the classes in its own patch (multiple-instance learning), which is what the "
        "MED's cross-attention reads; token: the class token alone, whose last layer then never trains the patch "
        "tokens; avg: the mean, which dilutes a one-patch object. Demo world (3-layer ViT/16 at 48 px, 1,500 steps): "
        "held-out exact label sets max 0.84 / token 0.54 / avg 0.27; linear probe of a patch token's shape 0.87 / 0.42 / 0.40",
    )
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0.0)
    min_lr: float = Field(1e-5, ge=0.0)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.05, ge=0.0)
    hflip_p: float = Field(0.5, ge=0.0, le=1.0, description="horizontal flips (class labels do not say left or right)")
    seed: int = 0
    cpus: float = Field(1.0, gt=0.0, description="Ray CPUs of the training task; torch threads: this, rounded up",
                        json_schema_extra=RUNTIME)
    use_gpu: bool | Literal["auto"] = Field("auto", description="auto: when the cluster has a GPU",
                                             json_schema_extra=RUNTIME)
    mixed_precision: Literal["auto", "bf16", "off"] = Field(
        "auto", description="auto: bf16 autocast where the hardware multiplies bf16 (a GPU; a CPU with AVX512-BF16 "
        "or AMX, for towers at least 128 wide), fp32 elsewhere", json_schema_extra=RUNTIME
    )
    log_every: int = Field(100, gt=0, json_schema_extra=RUNTIME)

    @model_validator(mode="after")
    def _check(self) -> "VisionPretrainConfig":
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} must be below steps {self.steps}")
        return self


def _ensemble_field(how_capfilt_uses_them: str) -> Any:
    # Out of the stage's identity (RUNTIME): each member is a stage of its own, identified by its own seed
    # (member 0 is exactly the single model), and the CapFilt stage records which members it reads.
    return Field(1, ge=1, le=16, json_schema_extra=RUNTIME,
                 description=f"train this many, seeds seed, seed+1, ...; CapFilt uses every one: {how_capfilt_uses_them}")


class CaptionerTrainConfig(TrainConfig):
    """Captioner fine-tuning: LM only with the prompt, as BLIP's COCO captioning (lr 1e-5, cosine)."""

    steps: int = Field(500, gt=0)
    lr: float = Field(1e-5, gt=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "step"] = "cosine"
    max_text_length: int = Field(40, ge=2)
    objectives: list[Literal["itc", "itm", "lm"]] = Field(["lm"])
    prompt: str = "a picture of "
    image: ImageConfig = ImageConfig()
    ensemble: int = _ensemble_field("capfilt.sampling.num_captions captions from each (an ensemble, a direction "
                                    "the paper leaves open)")


class FilterTrainConfig(TrainConfig):
    """Filter fine-tuning: ITC + ITM, as BLIP's COCO retrieval (lr 1e-5, cosine)."""

    steps: int = Field(500, gt=0)
    lr: float = Field(1e-5, gt=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "step"] = "cosine"
    max_text_length: int = Field(35, ge=2)
    objectives: list[Literal["itc", "itm", "lm"]] = Field(["itc", "itm"])
    image: ImageConfig = ImageConfig()
    ensemble: int = _ensemble_field("the mean of their ITM match probabilities decides")


# --------------------------------------------------------------------------------------------------
# CapFilt -- capfilt/stages/capfilt/
# --------------------------------------------------------------------------------------------------


class ModelRef(Section):
    """A captioner or filter: a local directory or a hub id, as transformers' ``from_pretrained`` takes."""

    path: str
    revision: str | None = None
    name: str | None = Field(None, description="id recorded in the output; default: the path")


class CapFiltConfig(Section):
    """Caption web images with nucleus sampling and keep the texts the ITM filter says match."""

    web: ReaderConfig | None = Field(None, description="web pairs; None: the run's generated or ingested web shards")
    human: ReaderConfig | None = Field(None, description="human pairs passed through unchanged, marked 'human'")
    output: str | None = Field(None, description="output directory (local, s3://, gs://); None: inside the run dir")
    output_storage_options: dict[str, Any] = Field(default_factory=dict, json_schema_extra=RUNTIME)
    captioners: list[ModelRef] = Field(
        default_factory=list, description="K captions from each; empty: the run's fine-tuned captioner"
    )
    filters: list[ModelRef] = Field(
        default_factory=list, description="several filters average their match probabilities; empty: the run's filter"
    )
    sampling: CaptionSampling = CaptionSampling()
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="keep a text iff softmax(ITM)[match] >= threshold")
    keep_policy: Literal["threshold", "best_n"] = Field(
        "threshold", description="threshold: every text at or above it; best_n: the best_n highest of those"
    )
    best_n: int = Field(1, ge=1)
    score_web_text: bool = Field(True, description="False drops every web text and keeps only synthetic ones")
    max_caption_words: int = Field(30, gt=0, description="pre_caption's word limit for web and synthetic texts")
    max_text_length: int = Field(35, ge=2, description="tokens fed to the filter")
    itc_similarity: bool = Field(
        True, description="also record each text's ITC similarity (itc_sim); the keep decision reads ITM only, "
        "and the extra text-encoder pass costs a fifth to a third of the filter's time (false: itc_sim is null)",
    )
    round: int = Field(0, ge=0, description="bootstrapping round; part of every row's sampling seed")
    embed_images: bool = Field(False, description="write image bytes into pairs; default: a shard + row reference")
    max_unreadable_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="fail the stage (after committing what it read) when more of the input "
        "shards than this could not be read in full", json_schema_extra=RUNTIME,
    )
    batch_size: int = Field(32, gt=0, description="images per actor call", json_schema_extra=RUNTIME)
    decode_batch_size: int = Field(64, gt=0, description="images per CPU decode batch", json_schema_extra=RUNTIME)
    max_pixels: int = Field(ImageConfig.model_fields["max_pixels"].default, gt=0, description="decompression-bomb limit")
    actors: int | Literal["auto"] = Field(
        "auto", description="auto: as many as the cluster's GPUs, or spare CPUs, allow", json_schema_extra=RUNTIME
    )
    gpus_per_actor: float = Field(
        1.0, gt=0.0, description="on clusters with GPUs; fractions share a GPU", json_schema_extra=RUNTIME
    )
    cpus_per_actor: float = Field(
        1.0, gt=0.0, description="on CPU-only clusters, and host CPUs beside a GPU", json_schema_extra=RUNTIME
    )
    reserve_cpus_for_reading: float = Field(
        1.0, ge=0.0, description="CPUs the actor pool never takes, so read and decode tasks can run "
        "(on GPU clusters too: the actors' host CPUs leave this many free)",
        json_schema_extra=RUNTIME,
    )
    wait_for_resources_s: float = Field(
        600.0, ge=0.0,
        description="when the cluster has no room yet for one actor (or for `actors` of them) and the CPUs reserved "
        "for reading, ask Ray's autoscaler for them and wait this long before failing (0: fail at once)",
        json_schema_extra=RUNTIME,
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    rows_per_file: int = Field(
        100_000, gt=0, description="target rows per output file (whole input shards per file)",
        json_schema_extra=RUNTIME,
    )
    max_buffer_bytes: int = Field(
        256 * 2**20, gt=0,
        description="the driver commits finished shards when they reach rows_per_file rows or this many bytes of "
        "results (Arrow), whichever comes first: it bounds the driver's memory, at the cost of smaller files and "
        "more commits when rows are large (embed_images). Whole shards are never split, whatever the limit",
        json_schema_extra=RUNTIME,
    )

    @property
    def writes_captions(self) -> bool:
        return self.sampling.num_captions > 0

    @model_validator(mode="after")
    def _check_work(self) -> "CapFiltConfig":
        if not self.writes_captions and self.captioners:
            raise ValueError("capfilt.captioners is set but capfilt.sampling.num_captions is 0 (the filter alone): "
                             "remove one of them")
        if not self.writes_captions and not self.score_web_text:
            raise ValueError("capfilt.sampling.num_captions is 0 and capfilt.score_web_text is false: no text would "
                             "be scored or kept")
        return self


# --------------------------------------------------------------------------------------------------
# The pipeline -- capfilt/runner.py
# --------------------------------------------------------------------------------------------------


class EvaluateConfig(Section):
    """Retrieval, captioning and CapFilt quality on held-out data (capfilt/stages/evaluate.py)."""

    k_test: int = Field(256, ge=1, description="ITC candidates re-ranked by ITM per query (BLIP: 256; demo: 16)")
    batch_size: int = Field(64, gt=0, description="images, texts or ITM pairs per forward", json_schema_extra=RUNTIME)
    max_text_length: int = Field(35, ge=2, description="tokens per text for retrieval, as the reference")
    max_caption_words: int = Field(30, gt=0, description="pre_caption's word limit for the reference texts")
    max_test_images: int | None = Field(None, gt=0, description="the first N test images; None: all")
    sampling: CaptionSampling = Field(
        default_factory=lambda: BEAM_EVAL_SAMPLING.model_copy(), description="captioning; default: beam 3, 5-20 tokens"
    )
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="the CapFilt threshold: removal iff ITM prob below it")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when available", json_schema_extra=RUNTIME
    )

    @model_validator(mode="before")
    @classmethod
    def _beam_defaults(cls, data: Any) -> Any:
        # A partial `sampling:` overrides the evaluation defaults, not CaptionSampling's nucleus ones.
        if isinstance(data, dict) and isinstance(data.get("sampling"), dict):
            data = {**data, "sampling": {**BEAM_EVAL_SAMPLING.model_dump(), **data["sampling"]}}
        return data

    @model_validator(mode="after")
    def _check_sampling(self) -> "EvaluateConfig":
        if self.sampling.num_captions < 1:
            raise ValueError("evaluate.sampling.num_captions must be at least 1: evaluation captions every test image")
        return self


class ReportConfig(Section):
    """The HTML report on a CapFilt output (capfilt/reporting/report.py): bounded size whatever the output's."""

    buckets: int = Field(10, ge=1, le=100, description="gallery buckets over the web text's ITM probability")
    samples_per_bucket: int = Field(8, ge=0, description="images shown per bucket")
    max_rejects_per_reason: int = Field(6, ge=0, description="examples shown per reject reason")
    histogram_bins: int = Field(20, ge=2, le=200)
    thumbnail_size: int = Field(96, ge=16, le=512, description="longest thumbnail side in pixels, JPEG inline")
    max_shards_listed: int = Field(100, ge=0, description="shard accounting rows; shards with problems always listed")
    seed: int = Field(0, description="which images are sampled")


class RayConfig(Section):
    address: str | None = Field(None, description="an existing cluster (or RAY_ADDRESS); None: start a local one")
    num_cpus: int | None = Field(None, gt=0, description="local cluster only; None: every core")
    object_store_memory: int | None = Field(None, gt=0, description="bytes; local cluster only")


class DataConfig(Section):
    """The run's pairs. Unset splits come from the synth or ingest stage."""

    web: ReaderConfig | None = Field(None, description="noisy web pairs to bootstrap")
    human: ReaderConfig | None = Field(None, description="human-annotated pairs (COCO's role)")
    test: ReaderConfig | None = Field(None, description="held-out pairs for evaluation")


class PipelineConfig(Section):
    """A whole run. The sections present decide which stages run; capfilt/runner.py orders them."""

    name: str = "capfilt"
    run_dir: str | None = Field(None, description="where every artifact goes; None: runs/<name> under the cwd")
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig()
    synth: WorldConfig | None = None
    ingest: IngestConfig | None = None
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: MedConfig = MedConfig()
    pretrain_vision: VisionPretrainConfig | None = Field(
        None, description="the ViT as a classifier on labelled images first; the first pretraining starts from it",
    )
    pretrain: TrainConfig | None = Field(None, description="MED on raw web + human pairs, then on each round's output")
    finetune_captioner: CaptionerTrainConfig | None = None
    finetune_filter: FilterTrainConfig | None = None
    capfilt: CapFiltConfig | None = None
    rounds: int = Field(1, ge=0, description="bootstrapping rounds: round r's pairs pretrain round r+1's MED")
    round_pretrain_start: Literal["model_init", "previous_round"] = Field(
        "model_init",
        description="where each round's pretraining starts: model_init (as BLIP: a new model from the same "
        "initialisation as the noisy one, so rounds compare data, not training time) or previous_round (continue "
        "the previous round's MED)",
    )
    evaluate: EvaluateConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        init = self.model.init
        if self.pretrain_vision is not None and (init.vision or init.med or init.blip_retrieval or init.blip_captioning):
            raise ValueError("pretrain_vision gives the ViT, and so does model.init (vision, med or blip_*): choose one")
        if init.text_source and self.tokenizer.source == "train":
            raise ValueError(
                f"tokenizer.source 'train' learns a new vocabulary, which does not match the text model that "
                f"model.init loads ({init.text_source}); set tokenizer.source to that model's tokenizer"
            )
        return self


def read_yaml_mapping(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The mapping a YAML file (a path or an fsspec URL) holds, read safely; errors name the file."""
    import fsspec
    import yaml

    try:
        with fsspec.open(path, "rt", encoding="utf-8", **(storage_options or {})) as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as error:  # a directory, no permission, an unreachable bucket
        raise ConfigError(f"{path}: cannot be read: {error}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def is_comparison_data(data: dict[str, Any]) -> bool:
    """A comparison file (capfilt/compare.py: a base pipeline and rows of overrides), not a pipeline."""
    return "base" in data and "rows" in data


def validation_problems(error: Any, prefix: str = "") -> list[str]:
    """One line per invalid key of a pydantic ``ValidationError``, the key's dotted path after ``prefix``."""
    problems = []
    for item in error.errors():
        key = prefix + ".".join(str(part) for part in item["loc"]) or "(top level)"
        shown = item["type"] != "missing" and not isinstance(item["input"], dict)
        problems.append(f"  {key}: {item['msg']}" + (f" (got {item['input']!r})" if shown else ""))
    return problems


def validate_pipeline(data: dict[str, Any], path: str) -> PipelineConfig:
    """``data`` (read from ``path``) as a pipeline; the error names ``path`` and every offending key."""
    from pydantic import ValidationError

    if is_comparison_data(data):
        raise ConfigError(f"{path}: a comparison of pipelines (base and rows), not a pipeline: `capfilt compare {path}`")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as error:
        problems = validation_problems(error)
        raise ConfigError(f"{path}: {len(problems)} invalid key(s):\n" + "\n".join(problems)) from None


def load_pipeline(path: str, storage_options: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a pipeline YAML (safely) and validate it; errors name every offending key.

    ``path`` is a local file or an fsspec URL (``s3://bucket/pipeline.yaml``, ``gs://...``), opened with
    ``storage_options`` (default: none, so the backend finds its own, e.g. s3fs the ``AWS_*`` variables).
    Paths inside the file are not resolved against its folder: a relative data path or ``run_dir`` (and
    the default ``runs/<name>``) is relative to the working directory of the process that runs it.
    """
    return validate_pipeline(read_yaml_mapping(path, storage_options), path)


class ConfigError(ValueError):
    """A pipeline file that does not validate; the message names each bad key."""
