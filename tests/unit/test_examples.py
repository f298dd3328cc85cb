"""The examples in examples/ are valid FinetuneJobs that resolve to what their comments say
(the API server's view of them is tested in tests/e2e/test_chart.py, with a server-side dry
run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune_operator.cli import render
from finetune_operator.resolve import load_manifest, resolve_manifest
from finetune_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(
    path for path in (ROOT / "examples").glob("*.yaml") if "kind: FinetuneJob" in path.read_text()
)


def test_the_examples_the_docs_name_exist() -> None:
    names = {path.name for path in EXAMPLES}
    assert {
        "qlora-llama2-7b-alpaca.yaml",
        "lora-llama2-7b-alpaca.yaml",
        "dpo-llama2-7b-chat.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_resolves_and_renders(path: Path) -> None:
    text = path.read_text()
    manifest = load_manifest(text)
    resolved = resolve_manifest(manifest)
    assert resolved.gradient_accumulation_steps is not None
    assert resolved.gradient_accumulation_steps >= 1
    objects = list(yaml.safe_load_all(render(text, OperatorSettings())))
    job = next(o for o in objects if o["kind"] == "Job")
    assert job["spec"]["completions"] == resolved.workers


def test_qlora_example_is_four_intel_gpu_nodes() -> None:
    text = (ROOT / "examples" / "qlora-llama2-7b-alpaca.yaml").read_text()
    resolved = resolve_manifest(load_manifest(text))
    assert resolved.method.value == "qlora"
    assert resolved.model_name == "meta-llama/Llama-2-7b-hf"
    assert resolved.workers == 4 and resolved.world_size == 8
    assert resolved.gradient_accumulation_steps == 8
    job = next(
        o for o in yaml.safe_load_all(render(text, OperatorSettings())) if o["kind"] == "Job"
    )
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["gpu.intel.com/i915"] == "2"
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {
        "intel.feature.node.kubernetes.io/gpu": "true"
    }


def test_dpo_example_keeps_the_dpo_defaults() -> None:
    text = (ROOT / "examples" / "dpo-llama2-7b-chat.yaml").read_text()
    resolved = resolve_manifest(load_manifest(text))
    assert resolved.method.value == "dpo"
    assert resolved.global_batch_size == 16 and resolved.micro_batch_size == 4
    assert resolved.gradient_accumulation_steps == 1
    assert resolved.max_steps == 200


def test_storage_example_is_read_write_many() -> None:
    claim = yaml.safe_load((ROOT / "examples" / "storage.yaml").read_text())
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for path in EXAMPLES:
        volume = (load_manifest(path.read_text())["spec"].get("output") or {}).get("volumeClaim")
        assert volume in (None, claim["metadata"]["name"]), path.name
