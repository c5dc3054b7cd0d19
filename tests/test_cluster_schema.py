"""The cluster manifests checked by the platforms' own schemas, offline.

- KubeRay: cluster/kuberay/{raycluster,rayjob}.yaml against the `ray.io/v1` openAPIV3Schema of
  KubeRay's own CRDs (tests/vendor/kuberay_v1.5.1/, unmodified, with their licence), read the way
  the API server reads it with kubectl's default `--validate=strict`: unknown fields are errors
  (except under x-kubernetes-preserve-unknown-fields), `nullable`, list-map keys unique; plus the
  operator's own webhook-free checks (controllers/ray/utils/validation.go, ported below).
  Not evaluated: the CRDs' CEL rules (x-kubernetes-validations; in v1.5.1 only on `managedBy`,
  which a test checks the manifests never set), `format`s, and what only a live cluster decides
  (quotas, admission webhooks, the device plugins' resources).
- Kubernetes core objects (ServiceAccount, ConfigMap, and each worker group's pod template as a
  core/v1 PodTemplate) against Kubernetes' OpenAPI schemas as shipped by `kubernetes-validate`
  (strict: additionalProperties false).
- The Ray launcher file (cluster/aws.yaml): Ray's own `validate_config` (ray-schema.json) is in
  tests/test_cluster.py; here Ray's own autoscaler scheduler places the 8 x 8 training, the 64
  encoders and the decode tasks on the node types meant for them, and the small default on the
  1-GPU type.
"""

from __future__ import annotations

import copy
import hashlib
import re
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = ROOT / "tests" / "vendor" / "kuberay_v1.5.1"
MANIFESTS = [CLUSTER / "kuberay" / "raycluster.yaml", CLUSTER / "kuberay" / "rayjob.yaml"]
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are checked against (EKS standard support)


def load(path: Path):
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


# --- the CRD schema, read as the API server does -----------------------------------------------


def strict(schema):
    """openAPIV3Schema -> JSON Schema (draft 4, what OpenAPI 3.0 builds on) with the API server's
    strict field validation: an object with `properties` takes no other field unless it preserves
    unknown fields; `nullable` admits null; list-map/set semantics become keywords checked below."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k in ("items", "additionalProperties", "not") or k in ("anyOf", "allOf", "oneOf")
           else v for k, v in schema.items() if k != "properties"}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            out["additionalProperties"] = False
    if schema.get("nullable") and "type" in schema:
        out["type"] = [schema["type"], "null"]
    return out


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map — the API server refuses two items with the same keys."""
    import jsonschema

    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen = set()
    for item in instance:
        key = tuple(item.get(k) for k in keys) if isinstance(item, dict) else None
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry for keys {keys}: {key}")
        seen.add(key)


@lru_cache(maxsize=None)
def crd_validator(kind: str, version: str):
    import jsonschema

    crd = load(KUBERAY / f"ray.io_{kind.lower()}s.yaml")
    assert crd["spec"]["names"]["kind"] == kind
    versions = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    if version not in versions:
        return None
    schema = strict(versions[version]["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.extend(jsonschema.Draft4Validator, {"x-kubernetes-list-map-keys": _list_map_keys})
    cls.check_schema(schema)
    return cls(schema)


def cel_fields_set(schema: dict, doc, path: str = "") -> list:
    """Fields of `doc` that carry a CEL rule (x-kubernetes-validations) in `schema`: the one part
    of the CRD jsonschema cannot evaluate (in v1.5.1 only `managedBy`: immutable, two values)."""
    hits = [path] if schema.get("x-kubernetes-validations") else []
    if isinstance(doc, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in doc:
                hits += cel_fields_set(sub, doc[key], f"{path}.{key}".lstrip("."))
    elif isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            hits += cel_fields_set(schema["items"], item, f"{path}.{i}")
    return hits


def raw_schema(kind: str) -> dict:
    crd = load(KUBERAY / f"ray.io_{kind.lower()}s.yaml")
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def crd_errors(doc: dict) -> list:
    """The schema errors of one KubeRay object, as `path: message` lines."""
    group, _, version = doc.get("apiVersion", "").partition("/")
    validator = crd_validator(doc.get("kind"), version) if group == "ray.io" else None
    if validator is None:
        return [f"apiVersion: {doc.get('apiVersion')} of {doc.get('kind')} is not served by KubeRay v1.5.1"]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# --- the operator's own checks (KubeRay v1.5.1 controllers/ray/utils/validation.go) ---------------

QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                            r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
START_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")  # rayv1's constants


def _group_errors(name: str, group: dict) -> list:
    errors = []
    params, labels = group.get("rayStartParams", {}), group.get("labels", {})
    if any(params.get(k) for k in START_RESOURCES) and group.get("resources"):
        errors.append(f"{name}: resources in both rayStartParams and resources")
    if "labels" in params:
        errors.append(f"{name}: rayStartParams['labels'] is not supported; use labels")
    for key, value in labels.items():
        if not QUALIFIED_NAME.match(key) or len(key.rpartition("/")[0]) > 253:
            errors.append(f"{name}: invalid label key {key!r}")
        if not LABEL_VALUE.match(value):
            errors.append(f"{name}: invalid label value {value!r}")
    if not group["template"]["spec"].get("containers"):
        errors.append(f"{name}: no container")
    return errors


def operator_errors(doc: dict) -> list:
    errors = []
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    name = doc["metadata"]["name"]
    if doc["kind"] == "RayCluster" and (len(name) > 63 or not DNS1035.match(name)):
        errors.append("metadata.name: not a DNS-1035 label of at most 63 characters")
    errors += _group_errors("head", spec["headGroupSpec"])
    names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
    if len(set(names)) != len(names):
        errors.append("workerGroupSpecs: groupName not unique")
    for g in spec.get("workerGroupSpecs", []):
        errors += _group_errors(g["groupName"], g)
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
        if not lo <= g.get("replicas", lo) <= hi:
            errors.append(f"{g['groupName']}: replicas outside [minReplicas, maxReplicas]")
    if spec.get("authOptions", {}).get("mode") == "token":
        version = tuple(int(x) for x in re.findall(r"\d+", spec.get("rayVersion", "0"))[:3])
        if version < (2, 52, 0):
            errors.append("authOptions.mode token needs rayVersion >= 2.52.0")
    if doc["kind"] == "RayJob":
        s = doc["spec"]
        if s.get("ttlSecondsAfterFinished") and not s.get("shutdownAfterJobFinishes"):
            errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if not s.get("rayClusterSpec") and not s.get("clusterSelector"):
            errors.append("RayJob needs rayClusterSpec or clusterSelector")
        if s.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
            errors.append(f"submissionMode {s['submissionMode']!r}: not one of {SUBMISSION_MODES}")
        if s.get("activeDeadlineSeconds", 1) <= 0 or s.get("backoffLimit", 0) < 0:
            errors.append("activeDeadlineSeconds must be positive, backoffLimit not negative")
        if not isinstance(yaml.safe_load(s.get("runtimeEnvYAML") or "{}"), dict):
            errors.append("runtimeEnvYAML: not a YAML mapping")
    return errors


def test_vendored_crds_are_the_release():
    """The vendored CRDs are byte for byte the files SOURCE.md names (an edit to make a manifest
    pass would show here)."""
    source = (KUBERAY / "SOURCE.md").read_text()
    for name in ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"):
        digest = hashlib.sha256((KUBERAY / name).read_bytes()).hexdigest()
        assert re.search(rf"{re.escape(name)}\s+sha256 {digest}", source), name
    assert "Apache License" in (KUBERAY / "LICENSE").read_text()


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_passes_the_crd_schema(path):
    doc = load(path)
    assert crd_errors(doc) == []
    assert operator_errors(doc) == []
    assert cel_fields_set(raw_schema(doc["kind"]), doc) == []  # nothing left unchecked


def test_cel_rules_are_found_where_a_manifest_would_meet_them():
    doc = load(MANIFESTS[1])
    doc["spec"]["rayClusterSpec"]["managedBy"] = "ray.io/kuberay-operator"
    assert cel_fields_set(raw_schema("RayJob"), doc) == ["spec.rayClusterSpec.managedBy"]


def _job_group(d, name):
    return next(g for g in d["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == name)


def _container(d, name="gpu-8x"):
    return _job_group(d, name)["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d["spec"].update(shutdownAfterJobFinish=True), "spec: Additional properties"),
    (lambda d: _job_group(d, "gpu").update(maxReplica=4), "workerGroupSpecs.0: Additional properties"),
    (lambda d: _container(d).update(resource=_container(d).pop("resources")),
     "containers.0: Additional properties"),
    (lambda d: _container(d)["resources"]["limits"].update(memory="1000 GB"), "limits.memory"),
    (lambda d: _job_group(d, "gpu-8x")["rayStartParams"].update({"num-gpus": 8}), "rayStartParams.num-gpus"),
    (lambda d: _job_group(d, "gpu-8x").update(maxReplicas="8"), "maxReplicas"),
    (lambda d: _job_group(d, "gpu").pop("groupName"), "'groupName' is a required property"),
    (lambda d: _container(d)["env"].append({"name": "FI_PROVIDER", "value": "tcp"}), "duplicate entry"),
    (lambda d: d.update(apiVersion="ray.io/v2"), "not served"),
])
def test_crd_schema_rejects_mistakes(mutate, where):
    """The schema check has teeth: each of these edits of rayjob.yaml is an error, where it is."""
    doc = load(MANIFESTS[1])
    mutate(doc)
    errors = crd_errors(doc)
    assert errors and any(where in e for e in errors), errors


@pytest.mark.parametrize("mutate, where", [
    (lambda d: _job_group(d, "gpu-8x")["rayStartParams"].update({"num-gpus": "8"}), "both rayStartParams"),
    (lambda d: _job_group(d, "gpu-8x")["labels"].update(pool="train/8x"), "invalid label value"),
    (lambda d: _job_group(d, "gpu-8x")["rayStartParams"].update(labels="a=b"), "rayStartParams['labels']"),
    (lambda d: _job_group(d, "cpu-decode").update(groupName="gpu"), "not unique"),
    (lambda d: d["spec"]["rayClusterSpec"].update(rayVersion="2.50.0"), "2.52.0"),
    (lambda d: d["spec"].update(submissionMode="K8sMode"), "submissionMode"),
    (lambda d: d["spec"].update(runtimeEnvYAML="- a list"), "runtimeEnvYAML"),
])
def test_operator_rules_reject_mistakes(mutate, where):
    doc = load(MANIFESTS[1])
    mutate(doc)
    assert crd_errors(doc) == []  # the schema lets these through: the operator refuses them
    assert any(where in e for e in operator_errors(doc)), operator_errors(doc)


# --- Kubernetes core objects (kubernetes-validate: Kubernetes' OpenAPI as JSON schemas) --------


def k8s_errors(doc: dict) -> list:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"]
    return []


def core_objects() -> list:
    """ServiceAccounts, the ConfigMap, and each group's pod template as a core/v1 PodTemplate."""
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / "serviceaccounts.yaml").read_text()))
    docs.append(load(CLUSTER / "kuberay" / "config.yaml"))
    spec = load(MANIFESTS[0])["spec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    docs += [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"msprior-{name}"},
              "template": g["template"]} for name, g in groups]
    return docs


def test_core_objects_pass_kubernetes_schemas():
    docs = core_objects()
    assert {d["kind"] for d in docs} == {"ServiceAccount", "ConfigMap", "PodTemplate"}
    assert {name: k8s_errors(d) for d in docs for name in [d["metadata"]["name"]]} == {
        d["metadata"]["name"]: [] for d in docs}


@pytest.mark.parametrize("index, mutate, where", [
    (0, lambda d: d.update(automountServiceAccountTokens=False), "Additional properties"),
    (2, lambda d: d["data"].update(NCCL_DEBUG=1), "data.NCCL_DEBUG"),
    (-3, lambda d: d["template"]["spec"].update(automountServiceAccountToken="false"),
     "automountServiceAccountToken"),
    (-3, lambda d: d["template"]["spec"]["containers"][0].update(envfrom=[]), "Additional properties"),
])
def test_kubernetes_schemas_reject_mistakes(index, mutate, where):
    doc = copy.deepcopy(core_objects()[index])
    mutate(doc)
    errors = k8s_errors(doc)
    assert errors and where in errors[0], errors


# --- the 8 x 8 layout, and the small default kept ---------------------------------------------


def _workers(spec) -> dict:
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def test_both_platforms_express_8_nodes_x_8_gpus_and_keep_the_small_default():
    aws = load(CLUSTER / "aws.yaml")["available_node_types"]
    k8s = _workers(load(MANIFESTS[0])["spec"])
    # small default: at most four one-GPU nodes
    assert aws["gpu"]["resources"]["GPU"] == 1 and aws["gpu"]["max_workers"] == 4
    assert k8s["gpu"]["maxReplicas"] == 4 and k8s["gpu"]["template"]["spec"]["containers"][0][
        "resources"]["limits"]["nvidia.com/gpu"] == "1"
    # training: 8 nodes x 8 GPUs, one msprior_train slot per GPU; preprocess: 64 encoder slots
    for aws_name, k8s_name, nodes, gpus, slot in (("gpu_8x", "gpu-8x", 8, 8, "msprior_train"),
                                                 ("gpu_encode", "gpu-encode", 16, 4, "msprior_encode")):
        a, k = aws[aws_name], k8s[k8s_name]
        assert (a["max_workers"], a["resources"]["GPU"], a["resources"][slot]) == (nodes, gpus, gpus)
        limits = k["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert (k["maxReplicas"], int(limits["nvidia.com/gpu"]), int(k["resources"][slot])) == (nodes, gpus, gpus)
        assert a["labels"] == k["labels"]
    assert "GPU" not in aws["cpu_decode"]["resources"] and aws["cpu_decode"]["labels"] == k8s["cpu-decode"]["labels"]
    # nothing big starts by itself
    assert all(t.get("min_workers", 0) == 0 for t in aws.values())
    assert all(g["minReplicas"] == 0 == g["replicas"] for g in k8s.values())


def test_node_labels_pass_ray_label_syntax():
    from ray._private.label_utils import validate_node_label_syntax

    for node in load(CLUSTER / "aws.yaml")["available_node_types"].values():
        validate_node_label_syntax(node["labels"])
    with pytest.raises(ValueError):
        validate_node_label_syntax({"msprior/pool": "train/8x"})


def test_shared_storage_path_declared_once_per_platform():
    """MSPRIOR_STORAGE (runs and checkpoints) is set once for every node: the launcher's container
    options on AWS, the ConfigMap every pod reads on Kubernetes."""
    text = (CLUSTER / "aws.yaml").read_text()
    assert text.count("MSPRIOR_STORAGE=") == 1
    assert "--env MSPRIOR_STORAGE=s3://BUCKET/msprior/runs" in load(CLUSTER / "aws.yaml")["docker"]["run_options"]
    assert load(CLUSTER / "kuberay" / "config.yaml")["data"]["MSPRIOR_STORAGE"] == "s3://BUCKET/msprior/runs"
    for path in MANIFESTS:
        doc = load(path)
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        for g in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
            refs = [e.get("configMapRef", {}).get("name") for e in g["template"]["spec"]["containers"][0]["envFrom"]]
            assert "msprior-config" in refs


# --- Ray's own autoscaler places each demand on its pool ---------------------------------------


def nodes_to_launch(bundles=(), config=None, requested=()) -> dict:
    """What Ray's autoscaler (its ResourceDemandScheduler, as run on the head) launches on an idle
    cluster of aws.yaml for one pending PACK placement group of `bundles` (what Ray Train asks for
    its workers) and the shapes of a `request_resources` call (`requested`, cluster/reserve.py)."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import ResourceDemandScheduler
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE
    from ray.core.generated.common_pb2 import Bundle, PlacementStrategy
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData

    c = prepare_config(copy.deepcopy(config or load(CLUSTER / "aws.yaml")))
    validate_config(c)

    class HeadOnly:  # the provider as the scheduler sees it: just the head, running
        def non_terminated_nodes(self, _):
            return ["head"]

        def node_tags(self, _):
            return {TAG_RAY_NODE_KIND: "head", TAG_RAY_USER_NODE_TYPE: c["head_node_type"]}

        def internal_ip(self, _):
            return "10.0.0.1"

    head = {"10.0.0.1": dict(c["available_node_types"][c["head_node_type"]]["resources"])}
    pgs = [PlacementGroupTableData(strategy=PlacementStrategy.PACK, state=PlacementGroupTableData.PENDING,
                                   bundles=[Bundle(unit_resources=b) for b in bundles])] if bundles else []
    sched = ResourceDemandScheduler(HeadOnly(), c["available_node_types"], c["max_workers"],
                                    c["head_node_type"], upscaling_speed=1000.0)
    launch, infeasible = sched.get_nodes_to_launch(["head"], {}, [], head, pgs, head, list(requested),
                                                   NodeAvailabilitySummary({}))
    assert infeasible == []
    return dict(launch)


def test_ray_autoscaler_puts_each_demand_on_its_pool():
    gpu_worker = {"CPU": 1, "GPU": 1}
    # the small default: a 2- or 4-worker GPU training starts only 1-GPU nodes
    assert nodes_to_launch([gpu_worker] * 2) == {"gpu": 2}
    assert nodes_to_launch([gpu_worker] * 4) == {"gpu": 4}
    # 8 x 8: 64 Train workers asking a training slot start exactly 8 gpu_8x nodes (8 workers each)
    assert nodes_to_launch([{**gpu_worker, "msprior_train": 1}] * 64) == {"gpu_8x": 8}
    assert nodes_to_launch([{"CPU": 8, "GPU": 1, "msprior_train": 1}] * 64) == {"gpu_8x": 8}
    # 64 encoders on the encoder pool; CPU-only decode tasks never start a GPU node
    assert nodes_to_launch([{**gpu_worker, "msprior_encode": 1}] * 64) == {"gpu_encode": 16}
    assert set(nodes_to_launch([{"CPU": 1}] * 700)) == {"cpu_decode"}
    # why the slots exist: 64 plain GPU workers would be scattered over every GPU pool
    assert len(nodes_to_launch([gpu_worker] * 64)) > 1


def _reserve_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reserve", CLUSTER / "reserve.py")
    reserve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reserve)
    return reserve


def test_reserve_requests_start_the_pool_asked_for():
    """cluster/reserve.py's shapes (Ray's request_resources, before a job): --train 64 starts
    exactly the 8 gpu_8x nodes, 64 GPUs in all, so a 64-worker Train placement group of one GPU
    each then finds 8 free GPUs on each of 8 nodes and nowhere else; --gpus 2 the small pool."""
    reserve = _reserve_module()
    assert nodes_to_launch(requested=reserve.bundles({"train": 64})) == {"gpu_8x": 8}
    assert nodes_to_launch(requested=reserve.bundles({"encode": 64})) == {"gpu_encode": 16}
    assert nodes_to_launch(requested=reserve.bundles({"gpus": 2})) == {"gpu": 2}
    assert set(nodes_to_launch(requested=reserve.bundles({"decode_cpus": 512}))) == {"cpu_decode"}
    assert reserve.totals(reserve.bundles({"train": 64})) == {"GPU": 64, "msprior_train": 64}
    with pytest.raises(SystemExit):
        reserve.main([])  # nothing asked: a usage error, before any Ray call


@pytest.mark.timeout(300)
def test_reserve_writes_the_request_the_autoscaler_reads(ray_session, capsys):
    """On a real (local, fixed-size) Ray: the request lands where Ray's autoscaler reads it, the
    wait gives up with a one-line account of what is missing, `--release` clears it."""
    import json

    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    reserve = _reserve_module()
    assert reserve.main(["--train", "2", "--wait", "1"]) == 1  # no gpu_8x node will ever come here
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'msprior_train': 2.0" in err[0], err
    if not is_autoscaler_v2():
        asked = json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL))
        assert asked == [{"GPU": 1, "msprior_train": 1}] * 2
    assert reserve.main(["--release"]) == 0
    if not is_autoscaler_v2():
        assert json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)) == []
