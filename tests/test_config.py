"""Pipeline files: safe loading, errors that name the key, what counts as a stage's identity."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from capfilt.config import CapFiltConfig, ConfigError, PipelineConfig, TrainConfig, identity, load_pipeline
from capfilt.runner import plan

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "pipelines").glob("*.yaml")))
def test_shipped_pipelines_validate(name):
    path = str(REPO / "pipelines" / name)
    if "rows" in yaml.safe_load(Path(path).read_text()):  # a comparison (paper.yaml): every row a valid plan
        from capfilt.compare import load_comparison

        _, rows = load_comparison(path)
        assert rows and all(plan(row) for row in rows.values())
        with pytest.raises(ConfigError, match="capfilt compare"):
            load_pipeline(path)
    else:
        assert load_pipeline(path)


def test_errors_name_every_bad_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("pretrain:\n  stepz: 3\n  batch_size: -1\ncapfilt:\n  sampling: {nucleus_top_p: 2}\n")
    with pytest.raises(ConfigError) as error:
        load_pipeline(str(path))
    message = str(error.value)
    assert str(path) in message and "3 invalid key(s)" in message
    for key in ("pretrain.stepz", "pretrain.batch_size", "capfilt.sampling.nucleus_top_p"):
        assert key in message


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline(str(path))


def test_runtime_settings_are_not_part_of_a_stage_identity():
    base = CapFiltConfig()
    faster = CapFiltConfig(batch_size=512, actors=4, rows_per_file=10, reserve_cpus_for_reading=0)
    assert identity(base) == identity(faster)
    assert identity(base) != identity(CapFiltConfig(threshold=0.7))
    assert identity(base) != identity(CapFiltConfig(sampling={"num_captions": 3}))
    assert identity(TrainConfig(workers=1, log_every=5)) == identity(TrainConfig(workers=4, log_every=50))
    assert identity(TrainConfig()) != identity(TrainConfig(steps=7))
    assert identity(TrainConfig()) != identity(TrainConfig(image={"hflip_p": 0.0}))


def test_model_init_sources_that_conflict_are_named():
    from pydantic import ValidationError

    from capfilt.config import InitConfig, PipelineConfig

    with pytest.raises(ValidationError, match="med is a whole MED"):
        InitConfig(med="runs/x/med", vision="vit_base_patch16_224")
    with pytest.raises(ValidationError, match="vision and blip_retrieval / blip_captioning both give the vision tower"):
        InitConfig(vision="vit_base_patch16_224", blip_retrieval="Salesforce/blip-itm-base-coco")
    with pytest.raises(ValidationError, match="pretrain_vision gives the ViT, and so does model.init"):
        PipelineConfig(pretrain_vision={}, model={"init": {"vision": "vit_base_patch16_224"}})
    with pytest.raises(ValidationError, match="tokenizer.source 'train' learns a new vocabulary"):
        PipelineConfig(model={"init": {"blip_retrieval": "Salesforce/blip-itm-base-coco"}})
    assert not InitConfig().is_set() and InitConfig(text="bert-base-uncased").text_source == "bert-base-uncased"


def test_the_plan_starts_every_round_where_the_noisy_pretraining_started_unless_asked_otherwise():
    from capfilt.config import PipelineConfig
    sections = {"synth": {"num_labelled": 10}, "pretrain_vision": {}, "pretrain": {}, "finetune_captioner": {},
                "finetune_filter": {}, "capfilt": {}, "rounds": 2}
    steps = {step.name: step for step in plan(PipelineConfig.model_validate(sections))}
    assert list(steps)[:4] == ["synth", "pretrain_vision", "tokenizer", "pretrain_noisy"]
    assert steps["pretrain_noisy"].inputs == {"vision": "pretrain_vision"}
    assert steps["round_1/pretrain"].inputs == {"capfilt": "round_1/capfilt", "vision": "pretrain_vision"}
    assert steps["round_1/finetune_filter"].inputs == {"init": "round_0/pretrain"}

    continued = plan(PipelineConfig.model_validate({**sections, "round_pretrain_start": "previous_round"}))
    rounds = {step.name: step.inputs for step in continued}
    assert rounds["round_0/pretrain"] == {"capfilt": "round_0/capfilt", "continue": "pretrain_noisy"}
    assert rounds["round_1/pretrain"] == {"capfilt": "round_1/capfilt", "continue": "round_0/pretrain"}

    # Evaluation sees every round: each round's MED (the last is "bootstrapped") and each CapFilt output.
    evaluated = plan(PipelineConfig.model_validate({**sections, "evaluate": {}}))[-1]
    assert evaluated.inputs == {"models": {"noisy": "pretrain_noisy", "round_0": "round_0/pretrain",
                                           "bootstrapped": "round_1/pretrain"},
                                "capfilt": {"round_0": "round_0/capfilt", "round_1": "round_1/capfilt"}}

    from_blip = plan(PipelineConfig.model_validate({
        "tokenizer": {"source": "Salesforce/blip-itm-base-coco"}, "finetune_filter": {}, "capfilt": {},
        "model": {"init": {"blip_retrieval": "Salesforce/blip-itm-base-coco"}}}))
    assert [step.name for step in from_blip] == ["tokenizer", "model_init", "round_0/finetune_filter", "round_0/capfilt"]
    with pytest.raises(ValueError, match="needs a pretrain section or model.init"):
        plan(PipelineConfig.model_validate({"finetune_filter": {}, "capfilt": {}}))


def test_the_filter_alone_plans_no_captioner_and_refuses_what_contradicts_it(tmp_path):
    """BLIP's ablations as settings: num_captions 0 is the filter alone, threshold 0 keeps every text."""
    sections = {"synth": {}, "pretrain": {}, "finetune_captioner": {}, "finetune_filter": {}, "evaluate": {}}
    alone = plan(PipelineConfig.model_validate({**sections, "capfilt": {"sampling": {"num_captions": 0}}}))
    steps = {step.name: step.inputs for step in alone}
    assert "round_0/finetune_captioner" not in steps and "round_0/finetune_filter" in steps
    assert steps["round_0/capfilt"] == {"round": 0, "filter": {"filter-round0": "round_0/finetune_filter"}}
    both = {step.name for step in plan(PipelineConfig.model_validate({**sections, "capfilt": {}}))}
    assert "round_0/finetune_captioner" in both

    path = tmp_path / "contradicts.yaml"
    path.write_text("capfilt:\n  sampling: {num_captions: 0}\n  captioners: [{path: some/captioner}]\n")
    with pytest.raises(ConfigError, match=r"capfilt: .*captioners is set but capfilt.sampling.num_captions is 0"):
        load_pipeline(str(path))
    path.write_text("capfilt:\n  sampling: {num_captions: 0}\n  score_web_text: false\n")
    with pytest.raises(ConfigError, match="no text would be scored"):
        load_pipeline(str(path))
    path.write_text("evaluate:\n  sampling: {num_captions: 0}\n")
    with pytest.raises(ConfigError, match="evaluate.sampling.num_captions must be at least 1"):
        load_pipeline(str(path))


def test_a_pipeline_is_read_from_object_storage(s3_server, monkeypatch):
    """`capfilt validate s3://...` and `load_pipeline`: through fsspec, credentials from the environment."""
    import s3fs
    from click.testing import CliRunner

    from capfilt.cli import main

    good = ("name: from-s3\ndata: {web: {paths: 's3://elsewhere/*.parquet'}, human: {paths: 'h/*.parquet'}}\n"
            "pretrain: {steps: 3}\n")
    s3_server.client.put_object(Bucket=s3_server.bucket, Key="pipelines/good.yaml", Body=good.encode())
    s3_server.client.put_object(Bucket=s3_server.bucket, Key="pipelines/bad.yaml",
                                Body=b"pretrain:\n  stepz: 3\n  batch_size: -1\n")
    # As s3fs finds them by default: no storage options, only AWS_* variables.
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # an S3FileSystem made earlier with other variables
    try:
        config = load_pipeline(s3_server.url("pipelines/good.yaml"))
        assert config.name == "from-s3" and config.pretrain.steps == 3
        assert load_pipeline(s3_server.url("pipelines/good.yaml"), s3_server.storage_options) == config

        with pytest.raises(ConfigError) as error:
            load_pipeline(s3_server.url("pipelines/bad.yaml"))
        message = str(error.value)
        assert s3_server.url("pipelines/bad.yaml") in message and "2 invalid key(s)" in message
        assert "pretrain.stepz" in message and "pretrain.batch_size" in message
        with pytest.raises(ConfigError, match="missing.yaml: no such file"):
            load_pipeline(s3_server.url("pipelines/missing.yaml"))

        cli = CliRunner()
        result = cli.invoke(main, ["validate", s3_server.url("pipelines/good.yaml")])
        assert result.exit_code == 0, result.output
        assert result.output.strip() == f"{s3_server.url('pipelines/good.yaml')}: valid; stages: tokenizer, pretrain_noisy"
        result = cli.invoke(main, ["validate", s3_server.url("pipelines/bad.yaml")])
        assert result.exit_code == 1 and "pretrain.stepz" in result.output
        result = cli.invoke(main, ["run", s3_server.url("pipelines/missing.yaml")])  # refused before Ray starts
        assert result.exit_code == 1 and "missing.yaml: no such file" in result.output
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_missing_local_pipeline_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such file"):
        load_pipeline(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="cannot be read"):
        load_pipeline(str(tmp_path))


def test_an_ensemble_is_one_fine_tune_per_seed_and_its_first_member_is_the_single_model():
    sections = {"pretrain": {}, "finetune_captioner": {"seed": 5}, "finetune_filter": {}, "capfilt": {}}
    single = {step.name: step for step in plan(PipelineConfig.model_validate(sections))}
    ensemble = {step.name: step for step in plan(PipelineConfig.model_validate(
        {**sections, "finetune_captioner": {"seed": 5, "ensemble": 3}, "finetune_filter": {"ensemble": 2}}))}
    captioners = ["round_0/finetune_captioner", "round_0/finetune_captioner_1", "round_0/finetune_captioner_2"]
    assert [name for name in ensemble if "finetune" in name] == [*captioners, "round_0/finetune_filter",
                                                                  "round_0/finetune_filter_1"]
    assert [ensemble[name].section.seed for name in captioners] == [5, 6, 7]
    # Member 0 has the single model's identity: a run with and without the ensemble shares that stage.
    assert identity(ensemble[captioners[0]].section) == identity(single[captioners[0]].section)
    assert identity(ensemble[captioners[1]].section) != identity(single[captioners[0]].section)
    assert ensemble["round_0/capfilt"].inputs["captioner"] == {
        "captioner-round0": captioners[0], "captioner-round0-1": captioners[1], "captioner-round0-2": captioners[2]}
    assert ensemble["round_0/capfilt"].inputs["filter"] == {
        "filter-round0": "round_0/finetune_filter", "filter-round0-1": "round_0/finetune_filter_1"}
