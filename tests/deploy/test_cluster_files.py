"""The worker image and cluster files, checked as far as possible without a Docker engine."""

import re
import shlex
from pathlib import Path

import yaml

from capfilt.config import load_pipeline

ROOT = Path(__file__).resolve().parents[2]


def _dockerfile_instructions():
    text = (ROOT / "docker/Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_copies_files_that_exist_and_runs_the_readme_install():
    instructions = _dockerfile_instructions()
    assert instructions[0].startswith("ARG BASE_IMAGE=") and any(i.startswith("FROM ${BASE_IMAGE}") for i in instructions)
    copies = [shlex.split(i)[1:-1] for i in instructions if i.startswith("COPY")]
    sources = [s for parts in copies for s in parts if not s.startswith("--")]
    assert sources and all((ROOT / source).exists() for source in sources), sources
    runs = " ".join(i for i in instructions if i.startswith("RUN"))
    install = re.search(r"pip install \.", runs)
    assert install, "the image must install capfilt from this repo's pyproject"
    readme = (ROOT / "README.md").read_text()
    assert "pip install ." in readme
    assert "faiss-gpu" in runs and "faiss-gpu" in readme


def test_cluster_files_parse_and_run_a_pipeline_that_validates():
    cluster = yaml.safe_load((ROOT / "docker/ray-cluster.yaml").read_text())
    job = yaml.safe_load((ROOT / "docker/rayjob.yaml").read_text())
    assert cluster["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert cluster["head_node_type"] in cluster["available_node_types"]
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert cluster["docker"]["image"] == workers["template"]["spec"]["containers"][0]["image"]
    assert "capfilt run" in job["spec"]["entrypoint"]
    named = re.findall(r"pipelines/([\w.-]+\.yaml)", job["spec"]["entrypoint"])
    assert named and all((ROOT / "pipelines" / name).exists() for name in named)
    for name in named:
        config = load_pipeline(str(ROOT / "pipelines" / name))
        assert config.capfilt.actors == workers["replicas"]
        assert config.capfilt.captioners[0].path.startswith("Salesforce/")


def test_every_example_pipeline_validates():
    from capfilt.compare import is_comparison, load_comparison

    for path in sorted((ROOT / "pipelines").glob("*.yaml")):
        if is_comparison(str(path)):  # paper.yaml: every row a pipeline
            assert load_comparison(str(path))[1]
        else:
            load_pipeline(str(path))
