"""deploy/: every manifest and the rendered Helm chart validate against the Kubernetes object
schemas (unknown fields are errors, so a typo fails), and the config they carry loads."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def check_object(data: Any, type_name: str, where: str) -> None:
    """Walk ``data`` along the kubernetes client's model types; raise on unknown fields."""
    import kubernetes.client as k8s

    if data is None:
        return
    m = re.fullmatch(r"[Ll]ist\[(.+)\]", type_name)
    if m:
        assert isinstance(data, list), f"{where}: expected a list"
        for i, item in enumerate(data):
            check_object(item, m.group(1), f"{where}[{i}]")
        return
    m = re.fullmatch(r"dict\(str, (.+)\)|[Dd]ict\[str, (.+)\]", type_name)
    if m:
        assert isinstance(data, dict), f"{where}: expected a mapping"
        for k, v in data.items():
            check_object(v, m.group(1) or m.group(2), f"{where}.{k}")
        return
    if type_name in ("str", "int", "bool", "float", "object", "datetime", "date"):
        if type_name == "str":
            quantity = ".resources." in where and isinstance(data, int | float)  # e.g. gpu: 1
            assert isinstance(data, str) or quantity, f"{where}: expected a string, got {data!r}"
        elif type_name == "int":
            assert isinstance(data, int) and not isinstance(data, bool), f"{where}: expected int"
        elif type_name == "bool":
            assert isinstance(data, bool), f"{where}: expected a boolean"
        return
    cls = getattr(k8s, type_name)
    assert isinstance(data, dict), f"{where}: expected an object for {type_name}"
    json_to_attr = {v: k for k, v in cls.attribute_map.items()}
    for key, value in data.items():
        assert key in json_to_attr, f"{where}: unknown field {key!r} in {type_name}"
        check_object(value, cls.openapi_types[json_to_attr[key]], f"{where}.{key}")


def model_name(doc: dict[str, Any]) -> str:
    group_version = doc["apiVersion"].split("/")[-1]
    return f"{group_version.capitalize()}{doc['kind']}"


def validate(docs: list[Any], source: str) -> list[dict[str, Any]]:
    out = []
    for doc in docs:
        if doc is None:
            continue
        check_object(doc, model_name(doc), f"{source}:{doc['kind']}/{doc['metadata']['name']}")
        out.append(doc)
    return out


def test_every_manifest_validates() -> None:
    kinds = set()
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in validate(list(yaml.safe_load_all(path.read_text())), path.name):
            kinds.add(doc["kind"])
    assert {"DaemonSet", "ConfigMap", "Secret", "StatefulSet", "Service", "Deployment"} <= kinds


def test_a_typo_fails() -> None:
    doc = yaml.safe_load((DEPLOY / "k8s" / "daemonset.yaml").read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(AssertionError, match="unknown field 'volumeMount'"):
        validate([doc], "typo")


def helm() -> str:
    path = shutil.which("helm") or os.path.join(os.path.dirname(sys.executable), "helm")
    if not os.path.exists(path):
        pytest.skip("helm is not installed (scripts/setup.sh installs it)")
    return path


@pytest.mark.parametrize(
    "sets",
    [[], ["--set", "cluster.etcd=null", "--set", "metrics.enabled=false"], ["--set", "nic=ucx"]],
)
def test_rendered_chart_validates(sets: list[str]) -> None:
    out = subprocess.run(
        [helm(), "template", "t", str(DEPLOY / "helm" / "mows"), *sets],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    docs = validate(list(yaml.safe_load_all(out)), "chart")
    assert "DaemonSet" in {d["kind"] for d in docs}
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    check_config(cm["data"]["mows.toml"])


def test_configmap_toml_loads() -> None:
    (cm,) = yaml.safe_load_all((DEPLOY / "k8s" / "configmap.yaml").read_text())
    check_config(cm["data"]["mows.toml"])


def check_config(text: str) -> None:
    from mows._config import load_daemon_config

    with tempfile.NamedTemporaryFile("w", suffix=".toml") as fh:
        fh.write(text)
        fh.flush()
        cfg = load_daemon_config({}, config_file=fh.name, env={})
    assert cfg.max_memory > 0 and cfg.model_paths
