"""deploy/: every manifest and the rendered Helm chart validate against the Kubernetes object
schemas (unknown fields are errors, so a typo fails), and the config they carry loads.

Beyond the schemas, the daemon's pod must be able to run as intended: the Secrets it reads are
readable by its uid, the memory limit covers the pool (tmpfs pages are charged to its cgroup), a
startupProbe covers adoption, the container is locked down, no cluster secret ships with the
manifests or the chart, and the example etcd compacts, has a quota and speaks mutual TLS only.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemons import stop_server

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
GiB = 2**30
OVERHEAD = (
    2 * GiB
)  # the daemon's own memory on top of the pool (README: limit = max_memory + 2 GiB)
# What the chart needs to render with etcd: the Secrets the operator created (no defaults).
CHART_SECRETS = [
    "--set",
    "cluster.existingSecret=mows-cluster-secret",
    "--set",
    "cluster.etcdTLSSecret=mows-etcd-client-tls",
]


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


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += validate(list(yaml.safe_load_all(path.read_text())), path.name)
    return docs


def test_every_manifest_validates() -> None:
    kinds = {doc["kind"] for doc in k8s_docs()}
    assert {"DaemonSet", "ConfigMap", "StatefulSet", "Service", "Deployment"} <= kinds


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


def render(*sets: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm(), "template", "t", str(DEPLOY / "helm" / "mows"), *sets],
        capture_output=True,
        text=True,
    )


def render_chart(*sets: str) -> list[dict[str, Any]]:
    out = render(*CHART_SECRETS, *sets)
    assert out.returncode == 0, out.stderr
    return validate(list(yaml.safe_load_all(out.stdout)), "chart")


CHART_VARIANTS = [
    [],
    ["--set", "cluster.etcd=null", "--set", "metrics.enabled=false"],
    ["--set", "nic=ucx"],
    ["--set", "pool.maxMemoryGiB=1000", "--set", "resources.overheadGiB=4"],
    [
        "--set",
        "cluster.existingSecret=",
        "--set",
        "cluster.secret=0123456789abcdef0123456789abcdef",
        "--set",
        "cluster.etcdUser=mows",
        "--set",
        "cluster.etcdPasswordSecret=mows-etcd-password",
    ],
]


@pytest.mark.parametrize("sets", CHART_VARIANTS)
def test_rendered_chart_validates(sets: list[str]) -> None:
    docs = render_chart(*sets)
    assert "DaemonSet" in {d["kind"] for d in docs}
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    check_config(cm["data"]["mows.toml"])


@pytest.mark.parametrize("sets", CHART_VARIANTS)
def test_rendered_daemon_can_run(sets: list[str]) -> None:
    check_daemon_pod(render_chart(*sets))


def test_static_daemon_can_run() -> None:
    check_daemon_pod(k8s_docs())


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
    if cfg.etcd:  # the directory over TLS, with a client certificate
        assert all(url.startswith("https://") for url in cfg.etcd), cfg.etcd
        assert cfg.etcd_ca_file and cfg.etcd_cert_file and cfg.etcd_key_file
        assert cfg.cluster_secret_file


# -- the daemon's pod: what it needs to run as intended ---------------------------------------


def image_uid() -> int:
    """The uid the image runs as (``USER`` in the Dockerfile)."""
    m = re.search(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert m, "Dockerfile: no numeric USER"
    return int(m.group(1))


def daemon_parts(
    docs: list[dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The DaemonSet's pod spec, its mows container, and the config (TOML) it is given."""
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "mows"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "mows.toml" in d.get("data", {})]
    return pod, container, tomllib.loads(cm["data"]["mows.toml"])


def effective(pod: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    """A security setting as the kubelet applies it: the container's, else the pod's."""
    own = (container.get("securityContext") or {}).get(key)
    return own if own is not None else (pod.get("securityContext") or {}).get(key)


def mount_of(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[Any, Any, str]:
    """(volumeMount, volume, path inside the volume) of the deepest mount holding ``path``."""
    best = None
    for m in container.get("volumeMounts") or []:
        root = m["mountPath"].rstrip("/")
        if (path == root or path.startswith(root + "/")) and (
            best is None or len(root) > len(best["mountPath"].rstrip("/"))
        ):
            best = m
    assert best is not None, f"{path}: no volume of the container holds it"
    (volume,) = [v for v in pod.get("volumes") or [] if v["name"] == best["name"]]
    inner = best.get("subPath") or path[len(best["mountPath"].rstrip("/")) + 1 :]
    return best, volume, inner


def readable(mode: int, uid: int, gids: set[int], file_gid: int) -> bool:
    """Whether ``uid`` (groups ``gids``) may read a root-owned file of group ``file_gid``.

    Without CAP_DAC_OVERRIDE even root goes by the owner bits. The kubelet ORs 0440 into a
    Secret's modes when fsGroup is set; that is not counted: the manifest must say what it means.
    """
    if uid == 0 and mode & 0o400:
        return True
    if file_gid in gids and mode & 0o040:
        return True
    return bool(mode & 0o004)


def check_secrets_readable(pod: dict[str, Any], container: dict[str, Any], conf: dict) -> None:
    uid = effective(pod, container, "runAsUser")
    fs_group = (pod.get("securityContext") or {}).get("fsGroup")
    gids = {effective(pod, container, "runAsGroup"), fs_group}
    gids |= set((pod.get("securityContext") or {}).get("supplementalGroups") or [])
    groups = sorted(g for g in gids if g is not None)
    file_gid = 0 if fs_group is None else fs_group  # Secret files are root:fsGroup, else root:root
    files = {k: v for k, v in conf.items() if k.endswith("_file") and str(v).startswith("/")}
    if conf.get("etcd"):
        assert {"cluster_secret_file", "etcd_ca_file", "etcd_cert_file", "etcd_key_file"} <= set(
            files
        ), f"cluster mode without the cluster secret or etcd TLS files: {sorted(files)}"
    for key, path in files.items():
        _, volume, inner = mount_of(pod, container, path)
        source = volume.get("secret") or volume.get("configMap")
        assert source is not None, f"{key} = {path}: not from a Secret or ConfigMap volume"
        mode = source.get("defaultMode", 0o644)
        items = source.get("items")
        if items:
            (item,) = [i for i in items if i["path"] == inner]
            mode = item.get("mode", mode)
        assert readable(mode, uid, gids, file_gid), (
            f"{key} = {path}: the daemon (uid {uid}, groups {groups}) "
            f"cannot read a file of mode {mode:04o} and group {file_gid}"
        )
    for volume in pod.get("volumes") or []:
        if "secret" in volume:  # every Secret the daemon mounts, named in the config or not
            mode = volume["secret"].get("defaultMode", 0o644)
            assert readable(mode, uid, gids, file_gid), (
                f"volume {volume['name']}: the daemon cannot read mode {mode:04o}"
            )


def check_memory(pod: dict[str, Any], container: dict[str, Any], conf: dict) -> None:
    from kubernetes.utils import parse_quantity

    from mows._config import parse_size

    pool = parse_size(conf["max_memory"], "max_memory")
    resources = container.get("resources") or {}
    for kind in ("limits", "requests"):
        value = (resources.get(kind) or {}).get("memory")
        assert value is not None and parse_quantity(value) >= pool + OVERHEAD, (
            f"memory {kind} {value}: the pool's tmpfs pages are charged to the daemon's cgroup, "
            f"so it must be >= max_memory ({conf['max_memory']}) + {OVERHEAD // GiB}Gi"
        )
    _, volume, _ = mount_of(pod, container, conf.get("pool_dir", "/dev/shm/mows"))
    if "emptyDir" in volume:
        empty = volume["emptyDir"] or {}
        assert empty.get("medium") != "Memory" or (
            empty.get("sizeLimit") is not None and parse_quantity(empty["sizeLimit"]) >= pool
        ), f"pool emptyDir {empty}: a tmpfs needs a sizeLimit >= max_memory"
    else:
        assert "hostPath" in volume, f"the pool is on {volume}: neither hostPath nor emptyDir"


def check_probes(container: dict[str, Any], conf: dict) -> None:
    probe = container.get("startupProbe")
    assert probe, "no startupProbe: adoption of a large pool runs before the socket opens"
    window = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
    assert window >= 600, f"startupProbe allows only {window} s for adoption (want >= 600)"
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(name)
        assert probe, f"no {name}"
        command = (probe.get("exec") or {}).get("command") or []
        assert command[:2] == ["mows", "status"] and conf["socket"] in command, (
            f"{name}: {command} does not ask the daemon on {conf['socket']}"
        )


def check_security_context(pod: dict[str, Any], container: dict[str, Any]) -> None:
    sc = container.get("securityContext") or {}
    uid = effective(pod, container, "runAsUser")
    assert uid == image_uid(), f"runAsUser {uid}: the image's user is {image_uid()}"
    assert effective(pod, container, "runAsNonRoot") is True, "runAsNonRoot is not set"
    assert sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem is not set"
    assert sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation is not false"
    assert not sc.get("privileged"), "privileged"
    caps = sc.get("capabilities") or {}
    assert "ALL" in (caps.get("drop") or []), "capabilities: ALL not dropped"
    assert not caps.get("add"), f"capabilities added: {caps.get('add')}"


def check_daemon_pod(docs: list[dict[str, Any]]) -> None:
    pod, container, conf = daemon_parts(docs)
    check_security_context(pod, container)
    check_secrets_readable(pod, container, conf)
    check_memory(pod, container, conf)
    check_probes(container, conf)
    for url in conf.get("etcd") or []:
        assert url.startswith("https://"), f"etcd endpoint {url}: plaintext"


def test_chart_memory_follows_the_pool() -> None:
    from kubernetes.utils import parse_quantity

    docs = render_chart("--set", "pool.maxMemoryGiB=1000", "--set", "resources.overheadGiB=4")
    _, container, conf = daemon_parts(docs)
    assert conf["max_memory"] == "1000GiB"
    limit = container["resources"]["limits"]["memory"]
    assert parse_quantity(limit) == 1004 * GiB


def mutate(docs: list[dict[str, Any]], where: str, change: Any) -> None:
    pod, container, _ = daemon_parts(docs)
    target = {"pod": pod, "container": container}[where]
    change(target)


def _volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (v,) = [v for v in pod["volumes"] if v["name"] == name]
    return v


def _config(docs: list[dict[str, Any]], old: str, new: str) -> None:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert old in cm["data"]["mows.toml"]
    cm["data"]["mows.toml"] = cm["data"]["mows.toml"].replace(old, new)


BREAKAGES: dict[str, tuple[str, Any, str]] = {
    "secret 0400": (
        "pod",
        lambda p: _volume(p, "secret")["secret"].update(defaultMode=0o400),
        "cannot read",
    ),
    "tls key 0400": (
        "pod",
        lambda p: _volume(p, "etcd-tls")["secret"].update(defaultMode=0o400),
        "etcd_.*cannot read",
    ),
    "no fsGroup": ("pod", lambda p: p["securityContext"].pop("fsGroup"), "cannot read"),
    "limit 2Gi": (
        "container",
        lambda c: c["resources"]["limits"].update(memory="2Gi"),
        "memory limits",
    ),
    "no limit": ("container", lambda c: c["resources"].pop("limits"), "memory limits"),
    "request 1Gi": (
        "container",
        lambda c: c["resources"]["requests"].update(memory="1Gi"),
        "memory requests",
    ),
    "tmpfs pool without sizeLimit": (
        "pod",
        lambda p: _volume(p, "pool").update(hostPath=None, emptyDir={"medium": "Memory"}),
        "sizeLimit",
    ),
    "no startupProbe": ("container", lambda c: c.pop("startupProbe"), "no startupProbe"),
    "short startupProbe": (
        "container",
        lambda c: c["startupProbe"].update(failureThreshold=3),
        "allows only 30 s",
    ),
    "no livenessProbe": ("container", lambda c: c.pop("livenessProbe"), "no livenessProbe"),
    "root": ("container", lambda c: c["securityContext"].update(runAsUser=0), "runAsUser 0"),
    "runAsNonRoot": (
        "container",
        lambda c: c["securityContext"].pop("runAsNonRoot"),
        "runAsNonRoot",
    ),
    "writable root": (
        "container",
        lambda c: c["securityContext"].update(readOnlyRootFilesystem=False),
        "readOnlyRootFilesystem",
    ),
    "escalation": (
        "container",
        lambda c: c["securityContext"].update(allowPrivilegeEscalation=True),
        "allowPrivilegeEscalation",
    ),
    "capabilities kept": (
        "container",
        lambda c: c["securityContext"]["capabilities"].update(drop=[]),
        "ALL not dropped",
    ),
    "capability added": (
        "container",
        lambda c: c["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
        "capabilities added",
    ),
}


def _drop_none(pod: dict[str, Any]) -> None:
    for v in pod["volumes"]:
        for k in [k for k, x in v.items() if x is None]:
            del v[k]


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_each_daemon_check_can_fail(name: str) -> None:
    where, change, message = BREAKAGES[name]
    for docs in (k8s_docs(), render_chart()):
        check_daemon_pod(docs)  # sound as shipped
        mutate(docs, where, change)
        _drop_none(daemon_parts(docs)[0])
        with pytest.raises(AssertionError, match=message):
            check_daemon_pod(docs)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("https://", "http://", "plaintext"),
        ('etcd_key_file = "/etc/mows/etcd-tls/', 'etcd_key_file = "/etc/mows/', "no volume"),
        ('etcd_key_file = "/etc/mows/etcd-tls/', 'etcd_key_file = "/run/mows/', "not from a"),
        ('max_memory = "200GiB"', 'max_memory = "300GiB"', "memory limits"),
    ],
)
def test_each_config_check_can_fail(old: str, new: str, message: str) -> None:
    for docs in (k8s_docs(), render_chart()):
        _config(docs, old, new)
        with pytest.raises(AssertionError, match=message):
            check_daemon_pod(docs)


# -- no cluster secret ships ------------------------------------------------------------------


def test_no_manifest_ships_a_secret() -> None:
    """The operator creates every Secret; each one the manifests mount says how, in a comment."""
    docs = k8s_docs()
    assert not [d for d in docs if d["kind"] == "Secret"], "deploy/k8s carries a Secret"
    text = "\n".join(p.read_text() for p in sorted((DEPLOY / "k8s").glob("*.yaml")))
    names = {
        v["secret"]["secretName"]
        for d in docs
        if d["kind"] in ("DaemonSet", "StatefulSet")
        for v in d["spec"]["template"]["spec"].get("volumes") or []
        if "secret" in v
    }
    assert {"mows-cluster-secret", "mows-etcd-tls", "mows-etcd-client-tls"} <= names
    for name in names:
        assert re.search(rf"#\s+kubectl .*create secret generic {name} ", text), (
            f"Secret {name}: no `kubectl create secret generic {name}` in the manifests' comments"
        )


def test_chart_ships_no_cluster_secret() -> None:
    values = yaml.safe_load((DEPLOY / "helm" / "mows" / "values.yaml").read_text())
    assert not values["cluster"]["secret"] and not values["cluster"]["existingSecret"]
    out = render("--set", "cluster.etcdTLSSecret=mows-etcd-client-tls")
    assert out.returncode != 0, "the chart renders without a cluster secret"
    assert "the chart ships no cluster secret: set cluster.existingSecret" in out.stderr
    assert not [d for d in render_chart() if d["kind"] == "Secret"]  # existingSecret: none made
    (secret,) = [
        d
        for d in render_chart(
            "--set", "cluster.existingSecret=", "--set", "cluster.secret=" + "s" * 32
        )
        if d["kind"] == "Secret"
    ]
    assert secret["stringData"] == {"cluster-secret": "s" * 32}


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ([], "ships no cluster secret"),
        (["--set", "cluster.etcdTLSSecret=x"], "ships no cluster secret"),
        (["--set", "cluster.existingSecret=x"], "cluster.etcdTLSSecret is required"),
        (
            [*CHART_SECRETS, "--set", "cluster.existingSecret=", "--set", "cluster.secret=short"],
            "at least 16",
        ),
        ([*CHART_SECRETS, "--set", "cluster.etcd[0]=http://etcd:2379"], "is not https://"),
        ([*CHART_SECRETS, "--set", "pool.maxMemoryGiB=1.5"], "whole number of GiB"),
        ([*CHART_SECRETS, "--set", "pool.maxMemoryGiB=200GiB"], "whole number of GiB"),
        ([*CHART_SECRETS, "--set", "resources.overheadGiB=0"], "resources.overheadGiB must be"),
        ([*CHART_SECRETS, "--set", "maxMemory=200GiB"], "replaced by pool.maxMemoryGiB"),
        ([*CHART_SECRETS, "--set", "cluster.etcdUser=mows"], "needs cluster.etcdPasswordSecret"),
    ],
)
def test_chart_refuses(sets: list[str], message: str) -> None:
    out = render(*sets)
    assert out.returncode != 0 and message in out.stderr, out.stderr or "rendered"


# -- the example etcd ---------------------------------------------------------------------------


def etcd_statefulset(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (sts,) = [
        d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "mows-etcd"
    ]
    return sts


def etcd_flags(sts: dict[str, Any]) -> dict[str, str]:
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    flags = {}
    for arg in [*(c.get("command") or [])[1:], *(c.get("args") or [])]:
        assert arg.startswith("--"), f"etcd argument {arg!r}"
        key, eq, value = arg[2:].partition("=")
        flags[key] = value if eq else "true"
    return flags


def check_etcd(sts: dict[str, Any]) -> None:
    from kubernetes.utils import parse_quantity

    flags = etcd_flags(sts)
    assert flags.get("auto-compaction-mode") in ("periodic", "revision"), "no auto-compaction"
    assert flags.get("auto-compaction-retention", "0") not in ("", "0"), "no compaction retention"
    quota = int(flags.get("quota-backend-bytes", "0"))
    assert 0 < quota <= 8 * GiB, f"quota-backend-bytes {quota}: set it explicitly, at most 8 GiB"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    storage = parse_quantity(claim["spec"]["resources"]["requests"]["storage"])
    assert storage >= 2 * quota, (
        f"{storage} bytes of disk for a {quota}-byte backend and its defrag"
    )
    for key in ("client-cert-auth", "peer-client-cert-auth"):
        assert flags.get(key) == "true", f"--{key} is not set"
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for key in ("trusted-ca-file", "cert-file", "key-file"):
        for prefix in ("", "peer-"):
            path = flags.get(prefix + key)
            assert path, f"--{prefix}{key} is not set"
            _, volume, _ = mount_of(pod, container, path)
            assert "secret" in volume, f"--{prefix}{key}={path}: not from a Secret"
    urls = [
        u
        for k in ("listen-client-urls", "advertise-client-urls", "listen-peer-urls")
        for u in flags.get(k, "").split(",")
    ]
    urls += re.findall(r"=([a-z]+://[^,]+)", flags.get("initial-cluster", ""))
    urls += flags.get("initial-advertise-peer-urls", "").split(",")
    urls += [u for u in flags.get("listen-metrics-urls", "").split(",") if u]
    for url in urls:
        assert url.startswith("https://"), f"etcd listens or advertises in plaintext: {url}"


def test_example_etcd_compacts_has_a_quota_and_requires_client_certificates() -> None:
    check_etcd(etcd_statefulset(k8s_docs()))


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("--auto-compaction-mode", "no auto-compaction"),
        ("--auto-compaction-retention", "no compaction retention"),
        ("--quota-backend-bytes", "quota-backend-bytes 0"),
        ("--client-cert-auth", "--client-cert-auth is not set"),
        ("--peer-client-cert-auth", "--peer-client-cert-auth is not set"),
        ("--trusted-ca-file", "--trusted-ca-file is not set"),
        ("--listen-client-urls", "plaintext: http://0.0.0.0:2379"),
    ],
)
def test_each_etcd_check_can_fail(drop: str, message: str) -> None:
    sts = etcd_statefulset(k8s_docs())
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    if drop == "--listen-client-urls":
        c["command"] = [
            a.replace("https://0.0.0.0:2379", "http://0.0.0.0:2379") for a in c["command"]
        ]
    else:
        c["command"] = [a for a in c["command"] if a.split("=")[0] != drop]
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_etcd(sts)


def secret_files(manifest: str, secret: str) -> dict[str, str]:
    """KEY -> file in certs/ of the documented `kubectl create secret generic SECRET` command."""
    text = (DEPLOY / "k8s" / manifest).read_text().replace("\\\n#", "")
    m = re.search(rf"create secret generic {secret} ((?:\s*--from-file=\S+)+)", text)
    assert m, f"{manifest}: no `create secret generic {secret}`"
    return dict(re.findall(r"--from-file=([^=\s]+)=certs/(\S+)", m.group(1)))


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Any:
    """A real etcd started with the manifest's flags and the certificates etcd-certs.sh makes,
    laid out as the documented Secrets lay them out. Yields (client URL, certs, other CA's
    certs, the daemon's etcd_*_file settings mapped onto certs)."""
    from tests.conftest import free_port, require_tool

    etcd = require_tool("etcd")
    require_tool("openssl")
    certs, other = tmp_path / "certs", tmp_path / "other"
    for out in (certs, other):
        subprocess.run(
            ["sh", str(DEPLOY / "k8s" / "etcd-certs.sh"), str(out)], check=True, capture_output=True
        )
    server = secret_files("etcd.yaml", "mows-etcd-tls")
    client = secret_files("daemonset.yaml", "mows-etcd-client-tls")
    assert set(server) == set(client) == {"ca.crt", "tls.crt", "tls.key"}

    docs = k8s_docs()
    pod, container, conf = daemon_parts(docs)
    daemon_files = {}
    for key in ("etcd_ca_file", "etcd_cert_file", "etcd_key_file"):
        _, volume, inner = mount_of(pod, container, conf[key])
        assert volume["secret"]["secretName"] == "mows-etcd-client-tls", key
        daemon_files[key] = str(certs / client[inner])

    sts = etcd_statefulset(docs)
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    keep = [
        "client-cert-auth",
        "peer-client-cert-auth",
        "auto-compaction-mode",
        "auto-compaction-retention",
        "quota-backend-bytes",
    ]
    flags = etcd_flags(sts)
    args = [f"--{k}={flags[k]}" for k in keep]
    for key in ("trusted-ca-file", "cert-file", "key-file"):
        for prefix in ("", "peer-"):
            _, volume, inner = mount_of(pod, container, flags[prefix + key])
            assert volume["secret"]["secretName"] == "mows-etcd-tls"
            args.append(f"--{prefix}{key}={certs / server[inner]}")
    cport, pport = free_port(), free_port()
    curl, purl = f"https://127.0.0.1:{cport}", f"https://127.0.0.1:{pport}"
    log = open(tmp_path / "etcd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            etcd,
            "--name=t",
            f"--data-dir={tmp_path / 'data'}",
            f"--listen-client-urls={curl}",
            f"--advertise-client-urls={curl}",
            f"--listen-peer-urls={purl}",
            f"--initial-advertise-peer-urls={purl}",
            f"--initial-cluster=t={purl}",
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        daemon = tls_context(daemon_files)
        deadline = time.monotonic() + 30
        while True:
            try:
                assert b'"health":"true"' in health(daemon, curl)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "etcd.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "etcd did not come up"
                time.sleep(0.2)
        yield curl, certs, other, daemon_files
    finally:
        stop_server(proc, log)


def tls_context(files: dict[str, str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=files["etcd_ca_file"])
    if files.get("etcd_cert_file"):
        ctx.load_cert_chain(files["etcd_cert_file"], files["etcd_key_file"])
    return ctx


def health(ctx: ssl.SSLContext | None, base: str) -> bytes:
    with urllib.request.urlopen(f"{base}/health", timeout=5, context=ctx) as r:
        return bytes(r.read())


def test_example_etcd_serves_only_mutual_tls(tls_etcd: Any) -> None:
    """The daemon's client certificate gets in (the fixture checked); no certificate, another
    CA's certificate, or plaintext HTTP does not."""
    url, _, other, files = tls_etcd
    ca = files["etcd_ca_file"]
    for ctx in (
        tls_context({"etcd_ca_file": ca}),
        tls_context(
            {
                "etcd_ca_file": ca,
                "etcd_cert_file": str(other / "client.crt"),
                "etcd_key_file": str(other / "client.key"),
            }
        ),
    ):
        with pytest.raises(OSError):
            health(ctx, url)
    with pytest.raises(OSError):
        health(None, url.replace("https://", "http://"))


def test_daemon_reaches_the_example_etcd(tls_etcd: Any) -> None:
    """The daemon's own etcd client, with the ConfigMap's etcd_*_file settings, writes and reads."""
    import asyncio

    _etcd = pytest.importorskip("mows.cluster._etcd")
    url, _, _, files = tls_etcd

    async def roundtrip() -> bytes:
        security = _etcd.EtcdSecurity.load(
            ca_file=files["etcd_ca_file"],
            cert_file=files["etcd_cert_file"],
            key_file=files["etcd_key_file"],
        )
        client = _etcd.open_client(url, security)
        await client.connect()
        try:
            await client.put(b"/mows/test/k", b"v")
            return bytes((await client.get(b"/mows/test/k")).value)
        finally:
            await client.close()

    assert asyncio.run(roundtrip()) == b"v"
