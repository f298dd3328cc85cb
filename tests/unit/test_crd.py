"""crds/ is generated from the API model; `finetune-operator crd` must equal it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_operator.crd import crd, crd_yaml

CRD_FILE = Path(__file__).parents[2] / "crds" / "finetunejob.yaml"


def test_crd_file_matches_the_code() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), (
        "crds/ drifted from the code: run `finetune-operator crd > crds/finetunejob.yaml`"
    )


def _walk(schema: dict[str, Any], path: str = "spec") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, child in schema.get("properties", {}).items():
        found += _walk(child, f"{path}.{name}")
    if "items" in schema:
        found += _walk(schema["items"], f"{path}[]")
    return found


def _spec_schema() -> dict[str, Any]:
    version = crd()["spec"]["versions"][0]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def test_every_spec_field_is_described_for_kubectl_explain() -> None:
    undocumented = [
        path
        for path, node in _walk(_spec_schema())
        if not node.get("description") and not path.endswith("[]")
    ]
    assert undocumented == []


def test_schema_is_structural() -> None:
    for path, node in _walk(_spec_schema()):
        assert "$ref" not in node and "anyOf" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path


def test_enums_bounds_and_names() -> None:
    spec = _spec_schema()["properties"]
    assert spec["method"]["enum"] == ["qlora", "lora", "full", "dpo"]
    assert spec["device"]["enum"] == ["xpu", "cuda", "cpu"]
    assert spec["workers"]["minimum"] == 1
    assert spec["training"]["properties"]["learningRate"]["exclusiveMinimum"] is True
    names = crd()["spec"]["names"]
    assert names["shortNames"] == ["ftj"] and names["kind"] == "FinetuneJob"


def test_printer_columns_and_status_subresource() -> None:
    version = crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Phase", "Workers", "Step", "Loss", "Age"]


def test_cel_rules_cover_the_batch_rule() -> None:
    rules = _spec_schema()["x-kubernetes-validations"]
    assert any("%" in rule["rule"] and "world size" in rule.get("message", "") for rule in rules)
