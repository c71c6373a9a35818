"""The Helm chart in helm/cloudburst, rendered and checked offline.

Rendering is Helm's own library (helm-python-sdk: ``helm template`` and ``helm lint`` without
a helm binary); built-in kinds are validated against Kubernetes' schemas (kubernetes-validate,
strict), KubeRay kinds against the openAPIV3Schema of KubeRay's CRDs in ../shared/kuberay,
tightened to refuse keys they do not declare. The tools come with the ``[deploy]`` extra.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import functools
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk is not installed (pip install -e '.[deploy]')"
)
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate",
    reason="kubernetes-validate is not installed (pip install -e '.[deploy]')",
)
jsonschema = pytest.importorskip(
    "jsonschema", reason="jsonschema is not installed (pip install -e '.[deploy]')"
)

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "cloudburst"
JOB_CONFIGS = ROOT / "jobs" / "configs"
KUBERAY = Path(__file__).resolve().parents[2] / "shared" / "kuberay"
KUBE_VERSION = "1.33"
RELEASE = "cloudburst"
NAMESPACE = "ml"
PROFILES = ["default", *sorted(p.stem for p in (CHART / "ci").glob("*.yaml"))]
CONFIGS_MOUNT = "/etc/cloudburst/configs"
REQUESTS_MOUNT = "/etc/cloudburst/requests"
CPU_IMAGE = "ghcr.io/cloudburst-platform/cloudburst:0.1.0-cpu"
GPU_IMAGE = "ghcr.io/cloudburst-platform/cloudburst:0.1.0-gpu"
GPU = "nvidia.com/gpu"
JOB_SOURCES = {
    "train": ["train.py", "_common.py"],  # train's parser is _common.job_parser
    "sweep": ["sweep.py"],
    "ensemble": ["ensemble.py"],
    "evaluate": ["evaluate.py"],
}
# names of values that would be credentials if written out
SECRETISH = re.compile(r"(?i)(passw|secret|token|api_?key|access_?key|private_?key)")
# keys that name a Secret or variable rather than hold a credential
REFERENCE_KEYS = {"secretName", "existingSecret", "passwordKey", "api_key_env"}
URL_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ------------------------------------------------------------------------------ rendering


@functools.cache
def chart() -> Any:
    return helm.Chart.load(str(CHART))


def profile_values(profile: str) -> dict:
    """The values a profile passes to Helm (nothing for the defaults)."""
    if profile == "default":
        return {}
    return yaml.safe_load((CHART / "ci" / f"{profile}.yaml").read_text())


def merged(base: dict, over: dict) -> dict:
    """Helm's coalescing: maps merged key by key, everything else replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def effective_values(profile: str) -> dict:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    return merged(defaults, profile_values(profile))


def render_values(values: dict, name: str = RELEASE) -> dict[str, str]:
    return chart().render(values, name=name, namespace=NAMESPACE)


def render_docs(values: dict, name: str = RELEASE) -> list[dict]:
    """The manifests (not NOTES.txt) rendered from ``values``."""
    out = render_values(values, name=name)
    return [
        d
        for k, v in sorted(out.items())
        if not k.endswith("NOTES.txt")
        for d in yaml.safe_load_all(v)
        if d
    ]


@functools.cache
def _rendered(profile: str) -> tuple[str, str]:
    out = render_values(profile_values(profile))
    notes = "".join(v for k, v in out.items() if k.endswith("NOTES.txt"))
    manifests = "\n---\n".join(v for k, v in sorted(out.items()) if not k.endswith("NOTES.txt"))
    return manifests, notes


def docs_of(profile: str) -> list[dict]:
    manifests, _ = _rendered(profile)
    return [d for d in yaml.safe_load_all(manifests) if d]


def notes_of(profile: str) -> str:
    return _rendered(profile)[1]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def cluster_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(owner, RayCluster spec) of the long-lived cluster, each RayJob's own cluster and the
    RayService's cluster."""
    specs = [
        (f"RayCluster/{d['metadata']['name']}", d["spec"]) for d in of_kind(docs, "RayCluster")
    ]
    specs += [
        (f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"])
        for d in of_kind(docs, "RayJob")
        if "rayClusterSpec" in d["spec"]
    ]
    specs += [
        (f"RayService/{d['metadata']['name']}", d["spec"]["rayClusterConfig"])
        for d in of_kind(docs, "RayService")
    ]
    return specs


def groups(spec: dict) -> dict[str, dict]:
    """Group name ("head", "cpu", "gpu") -> pod template."""
    out = {"head": spec["headGroupSpec"]["template"]}
    for group in spec.get("workerGroupSpecs", []):
        out[group["groupName"]] = group["template"]
    return out


def ray_containers(docs: list[dict]) -> list[tuple[str, dict]]:
    return [
        (f"{owner}/{group}/{c['name']}", c)
        for owner, spec in cluster_specs(docs)
        for group, template in groups(spec).items()
        for c in template["spec"]["containers"]
    ]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def env_value(container: dict, name: str) -> str | None:
    return env_of(container).get(name, {}).get("value")


def mlflow_container(docs: list[dict]) -> dict:
    deployment = one(docs, "Deployment", f"{RELEASE}-mlflow")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def flag_values(args: list[str]) -> dict[str, str]:
    """``--name=value`` arguments as a dict (``--flag`` alone: "")."""
    out = {}
    for arg in args:
        name, _, value = arg.partition("=")
        out[name] = value
    return out


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(path, key, value) of every mapping entry, descending into YAML held in strings."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")
    elif isinstance(node, str) and "\n" in node:
        try:
            inner = yaml.safe_load(node)
        except yaml.YAMLError:
            return
        if isinstance(inner, dict | list):
            yield from walk(inner, f"{path}<yaml>")


def literal_secrets(docs: list[dict]) -> list[str]:
    """Where the documents hold something that looks like a credential written out."""
    found = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        for path, key, value in walk(doc):
            if isinstance(value, str) and URL_WITH_PASSWORD.search(value):
                found.append(f"{name}{path}: URL with a password")
            if (
                isinstance(key, str)
                and key not in REFERENCE_KEYS
                and SECRETISH.search(key)
                and isinstance(value, str | int | float)
                and not isinstance(value, bool)
            ):
                found.append(f"{name}{path}: literal value")
            if key == "env" and isinstance(value, list):
                for entry in value:
                    if SECRETISH.search(entry["name"]) and (
                        "value" in entry or "secretKeyRef" not in entry.get("valueFrom", {})
                    ):
                        found.append(f"{name}{path}: {entry['name']} not from a Secret")
    return found


# ------------------------------------------------------------------------------ KubeRay CRDs


def tightened(node: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever properties are declared and
    neither additionalProperties nor x-kubernetes-preserve-unknown-fields is set."""
    if isinstance(node, list):
        return [tightened(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: tightened(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}


@functools.cache
def crd_validator(kind: str) -> Any:
    if not KUBERAY.is_dir():
        pytest.skip(f"KubeRay CRDs not found in {KUBERAY} (../shared/kuberay is optional)")
    crd = yaml.load((KUBERAY / CRD_FILES[kind]).read_text(), Loader=YAML_LOADER)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = tightened(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in crd_validator(doc["kind"]).iter_errors(doc)
    ]


# ------------------------------------------------------------------------------ the chart


def test_chart_versions_follow_the_package() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_pin = next(d for d in project["dependencies"] if d.startswith("ray["))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["appVersion"] == project["version"] == "0.1.0"
    assert values["ray"]["version"] == ray_pin.split("==")[1]


@pytest.mark.parametrize("profile", PROFILES)
def test_lint_strict(profile: str) -> None:
    report = helm.lint(str(CHART), profile_values(profile), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("profile", PROFILES)
def test_builtin_kinds_validate_strictly(profile: str) -> None:
    docs = [d for d in docs_of(profile) if not d["apiVersion"].startswith("ray.io/")]
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
    assert errors == []
    assert {"ConfigMap", "ServiceAccount", "Deployment", "Service"} <= {d["kind"] for d in docs}


@pytest.mark.parametrize("profile", PROFILES)
def test_kuberay_kinds_match_the_crds(profile: str) -> None:
    docs = [d for d in docs_of(profile) if d["apiVersion"].startswith("ray.io/")]
    assert docs, "no KubeRay resources rendered"
    assert {d["apiVersion"] for d in docs} == {"ray.io/v1"}
    errors = {f"{d['kind']}/{d['metadata']['name']}": crd_errors(d) for d in docs}
    assert errors == {name: [] for name in errors}


def test_tightened_crd_refuses_an_undeclared_field() -> None:
    cluster = copy.deepcopy(one(docs_of("default"), "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["minReplica"] = 1
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    errors = crd_errors(cluster)
    assert any("minReplica" in e for e in errors)
    assert any("imagePullPolicyy" in e for e in errors)


@pytest.mark.parametrize("profile", PROFILES)
def test_names_fit_kuberay_limits(profile: str) -> None:
    dns1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    limits = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
    docs = [d for d in docs_of(profile) if d["kind"] in limits]
    too_long = [
        d["metadata"]["name"] for d in docs if len(d["metadata"]["name"]) > limits[d["kind"]]
    ]
    assert too_long == []
    assert all(dns1035.match(d["metadata"]["name"]) for d in docs)


def test_long_release_names_are_shortened_within_kuberay_limits() -> None:
    values = merged(
        profile_values("gpu"),
        {"jobs": {"ensemble": profile_values("cpu-only")["jobs"]["ensemble"]}},
    )
    docs = render_docs(values, name="a-very-long-release-name-for-cloudburst-tests")
    names = {d["kind"]: [] for d in docs}
    for d in docs:
        names[d["kind"]].append(d["metadata"]["name"])
    assert max(map(len, names["RayJob"])) <= 47
    assert max(map(len, names["RayService"])) <= 47
    assert max(map(len, names["RayCluster"])) <= 53
    assert "a-very-long-release-name-for-cloudbu-ensemble" in names["RayJob"]


# ------------------------------------------------------------------------------ Ray clusters


def test_default_images_are_the_cpu_and_gpu_tags() -> None:
    cpu = [c["image"] for _, c in ray_containers(docs_of("default"))]
    gpu_docs = docs_of("gpu")
    by_group = {
        group: template["spec"]["containers"][0]["image"]
        for _, spec in cluster_specs(gpu_docs)
        for group, template in groups(spec).items()
    }
    assert cpu and set(cpu) == {CPU_IMAGE}
    assert by_group == {"head": CPU_IMAGE, "cpu": CPU_IMAGE, "gpu": GPU_IMAGE}


def test_gpu_limits_only_on_the_gpu_group() -> None:
    specs = cluster_specs(docs_of("gpu"))
    limits = {
        (owner, group): template["spec"]["containers"][0]["resources"].get("limits", {})
        for owner, spec in specs
        for group, template in groups(spec).items()
    }
    with_gpu = {key: lim[GPU] for key, lim in limits.items() if GPU in lim}
    assert len(specs) == 4  # the RayCluster, two RayJobs' clusters and the RayService's
    assert with_gpu == {(owner, "gpu"): 1 for owner, _ in specs}
    gpu_pods = [groups(spec)["gpu"]["spec"] for _, spec in specs]
    assert all(p["nodeSelector"] == {"nvidia.com/gpu.present": "true"} for p in gpu_pods)
    assert all(
        p["tolerations"] == [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
        for p in gpu_pods
    )


@pytest.mark.parametrize("profile", ["default", "cpu-only", "s3", "gcs"])
def test_no_gpus_without_the_gpu_profile(profile: str) -> None:
    docs = docs_of(profile)
    assert GPU not in json.dumps(docs)
    assert all(set(groups(spec)) == {"head", "cpu"} for _, spec in cluster_specs(docs))


@pytest.mark.parametrize("profile", PROFILES)
def test_every_ray_container_has_tmp_ray_on_an_empty_dir(profile: str) -> None:
    bad = []
    for owner, spec in cluster_specs(docs_of(profile)):
        for group, template in groups(spec).items():
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            for c in template["spec"]["containers"]:
                mounts = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp/ray"]
                if len(mounts) != 1 or "emptyDir" not in volumes[mounts[0]["name"]]:
                    bad.append(f"{owner}/{group}/{c['name']}")
    assert bad == []


def test_head_kept_free_of_work_when_not_schedulable() -> None:
    cpu_only = one(docs_of("cpu-only"), "RayCluster")["spec"]["headGroupSpec"]
    default = one(docs_of("default"), "RayCluster")["spec"]["headGroupSpec"]
    assert cpu_only["rayStartParams"]["num-cpus"] == "0"
    assert cpu_only["rayStartParams"]["object-store-memory"] == "2000000000"
    assert "num-cpus" not in default["rayStartParams"]


def test_autoscaling_and_replicas_from_values() -> None:
    spec = one(docs_of("cpu-only"), "RayCluster")["spec"]
    (cpu,) = spec["workerGroupSpecs"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == 60
    assert (cpu["groupName"], cpu["replicas"], cpu["minReplicas"], cpu["maxReplicas"]) == (
        "cpu",
        2,
        1,
        8,
    )
    resources = cpu["template"]["spec"]["containers"][0]["resources"]
    assert resources == {
        "requests": {"cpu": "4", "memory": "16Gi"},
        "limits": {"cpu": "4", "memory": "16Gi"},
    }


def test_autoscaler_off_leaves_no_options() -> None:
    docs = render_docs({"ray": {"autoscaling": {"enabled": False}}})
    spec = one(docs, "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is False
    assert "autoscalerOptions" not in spec


# ------------------------------------------------------------------------------ environment


@pytest.mark.parametrize("profile", PROFILES)
def test_ray_pods_get_the_program_defaults_and_no_local_ones(profile: str) -> None:
    from cloudburst import environment

    wanted = environment.defaults(environment.IMPORT, environment.PROGRAM)
    # single-machine defaults; a region the values give is the user's setting, not a default
    local_only = set(environment.defaults(environment.LOCAL, environment.EMULATOR))
    if effective_values(profile)["storage"]["s3"]["region"]:
        local_only.discard("AWS_DEFAULT_REGION")
    containers = ray_containers(docs_of(profile))
    assert wanted["RAY_USAGE_STATS_ENABLED"] == "0" and wanted["MLFLOW_DISABLE_TELEMETRY"] == "true"
    missing = {
        where: {k: v for k, v in wanted.items() if env_value(c, k) != v} for where, c in containers
    }
    leaked = {where: sorted(set(env_of(c)) & local_only) for where, c in containers}
    assert missing == {where: {} for where, _ in containers}
    assert leaked == {where: [] for where, _ in containers}
    assert {
        "NO_GCE_CHECK",
        "AWS_EC2_METADATA_DISABLED",
        "RAY_SERVE_DEFAULT_HTTP_HOST",
    } <= local_only


@pytest.mark.parametrize("profile", PROFILES)
def test_mlflow_and_ray_pods_agree_on_the_tracking_uri(profile: str) -> None:
    docs = docs_of(profile)
    uris = {env_value(c, "MLFLOW_TRACKING_URI") for _, c in ray_containers(docs)}
    (uri,) = uris
    service = one(docs, "Service", f"{RELEASE}-mlflow")
    deployment = one(docs, "Deployment", f"{RELEASE}-mlflow")
    container = mlflow_container(docs)
    args = flag_values(container["args"])
    url = urlsplit(uri)
    (port,) = service["spec"]["ports"]
    (container_port,) = container["ports"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    allowed = args["--allowed-hosts"].split(",")
    assert url.scheme == "http"
    assert url.hostname == f"{RELEASE}-mlflow.{NAMESPACE}.svc.cluster.local"
    assert url.port == port["port"] == int(args["--port"]) == container_port["containerPort"]
    assert port["targetPort"] == container_port["name"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for host in (url.netloc, "127.0.0.1:5000", "localhost:5000"):  # pods, port-forward
        assert any(fnmatch.fnmatch(host, p) if "*" in p else host == p for p in allowed), host


@pytest.mark.parametrize("profile", PROFILES)
def test_mlflow_server_command(profile: str) -> None:
    docs = docs_of(profile)
    container = mlflow_container(docs)
    args = flag_values(container["args"])
    env = env_of(container)
    backend = urlsplit(args["--backend-store-uri"])
    assert container["command"] == ["mlflow", "server"]
    assert backend.scheme.startswith("postgresql") and backend.password is None
    assert re.match(r"^(s3|gs)://[^/]+/.+", args["--artifacts-destination"])
    assert "--serve-artifacts" in args
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    assert set(env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]) == {"name", "key"}
    probes = (
        container["readinessProbe"]["httpGet"]["path"],
        container["livenessProbe"]["httpGet"]["path"],
    )
    assert probes == ("/health", "/health")


def test_bundled_postgresql() -> None:
    docs = docs_of("default")
    name = f"{RELEASE}-postgresql"
    statefulset = one(docs, "StatefulSet", name)
    service = one(docs, "Service", name)
    pod = statefulset["spec"]["template"]
    env = env_of(pod["spec"]["containers"][0])
    backend = flag_values(mlflow_container(docs)["args"])["--backend-store-uri"]
    mlflow_password = env_of(mlflow_container(docs))["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert backend == f"postgresql://mlflow@{name}.{NAMESPACE}.svc.cluster.local:5432/mlflow"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == mlflow_password
    assert mlflow_password == {"name": "cloudburst-postgresql", "key": "password"}
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"


def test_s3_profile_endpoint_credentials_and_external_database() -> None:
    docs = docs_of("s3")
    containers = ray_containers(docs)
    mlflow_env = env_of(mlflow_container(docs))
    args = flag_values(mlflow_container(docs)["args"])
    endpoint = "http://minio.storage.svc.cluster.local:9000"
    assert {env_value(c, "CLOUDBURST_ENDPOINT_URL") for _, c in containers} == {endpoint}
    assert {env_value(c, "AWS_DEFAULT_REGION") for _, c in containers} == {"us-east-1"}
    assert {json.dumps(env_of(c)["AWS_SECRET_ACCESS_KEY"]["valueFrom"]) for _, c in containers} == {
        json.dumps({"secretKeyRef": {"name": "cloudburst-s3", "key": "AWS_SECRET_ACCESS_KEY"}})
    }
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"]["value"] == endpoint
    assert mlflow_env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "cloudburst-s3"
    assert args["--artifacts-destination"] == "s3://cloudburst/mlflow-artifacts"
    assert args["--backend-store-uri"] == (
        "postgresql://mlflow@postgres.databases.svc.cluster.local:5432/mlflow?sslmode=require"
    )
    assert mlflow_env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "cloudburst-mlflow-db"
    assert of_kind(docs, "StatefulSet") == []


def test_gcs_profile_workload_identity_and_project() -> None:
    docs = docs_of("gcs")
    containers = ray_containers(docs)
    account = one(docs, "ServiceAccount")
    args = flag_values(mlflow_container(docs)["args"])
    names = {name for _, c in containers for name in env_of(c)}
    pods = [t["spec"] for _, spec in cluster_specs(docs) for t in groups(spec).values()]
    assert {env_value(c, "GOOGLE_CLOUD_PROJECT") for _, c in containers} == {"my-project"}
    assert account["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": "cloudburst@my-project.iam.gserviceaccount.com"
    }
    assert {p["serviceAccountName"] for p in pods} == {account["metadata"]["name"]}
    assert args["--artifacts-destination"] == "gs://cloudburst-my-project/mlflow"
    assert [n for n in names if n.startswith("AWS_")] == []
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in names  # workload identity: no key file


def test_gcs_key_file_from_a_secret_is_mounted() -> None:
    values = {
        "storage": {
            "provider": "gcs",
            "gcs": {"existingSecret": "gcs-key", "keyFileKey": "sa.json"},
        }
    }
    docs = render_docs(values)
    for where, c in [*ray_containers(docs), ("mlflow", mlflow_container(docs))]:
        path = env_value(c, "GOOGLE_APPLICATION_CREDENTIALS")
        mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        assert (where, path, mount["name"]) == (
            where,
            "/var/run/secrets/cloudburst/gcs/sa.json",
            "gcs-key",
        )
    assert literal_secrets(docs) == []


# ------------------------------------------------------------------------------ credentials


@pytest.mark.parametrize("profile", PROFILES)
def test_no_literal_secret_in_any_manifest(profile: str) -> None:
    docs = docs_of(profile)
    assert of_kind(docs, "Secret") == []
    assert literal_secrets(docs) == []


def test_secret_scan_finds_literals() -> None:
    doc = {
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {
            "containers": [{"name": "c", "env": [{"name": "DB_PASSWORD", "value": "hunter2"}]}],
            "config": "db: postgresql://u:hunter2@db:5432/x\napi_key: abc\n",
        },
    }
    found = literal_secrets([doc])
    assert any("DB_PASSWORD not from a Secret" in f for f in found)
    assert any(f.endswith(".api_key: literal value") for f in found)
    assert any(f.endswith(".db: URL with a password") for f in found)


@pytest.mark.parametrize("profile", ["gpu", "s3", "gcs"])
def test_endpoint_api_key_by_secret_reference(profile: str) -> None:
    from cloudburst.serving.settings import ServeSettings

    docs = docs_of(profile)
    values = effective_values(profile)
    service = one(docs, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    env_names = {
        ServeSettings.model_validate(app["args"]).api_key_env for app in config["applications"]
    }
    refs = {
        where: env_of(c)["CLOUDBURST_API_KEY"]["valueFrom"]["secretKeyRef"]
        for where, c in ray_containers([service])
    }
    assert env_names == {"CLOUDBURST_API_KEY"}
    assert all("api_key" not in app["args"] for app in config["applications"])
    expected = {
        "name": values["serve"]["apiKey"]["existingSecret"],
        "key": values["serve"]["apiKey"]["key"],
    }
    assert refs == {where: expected for where in refs}
    others = [c for d in docs if d["kind"] != "RayService" for _, c in ray_containers([d])]
    assert [c for c in others if "CLOUDBURST_API_KEY" in env_of(c)] == []


# ------------------------------------------------------------------------------ RayService


@pytest.mark.parametrize("profile", ["gpu", "s3", "gcs"])
def test_serve_config_is_the_repo_serve_yaml_with_the_documented_overrides(profile: str) -> None:
    from cloudburst.serving.settings import ServeSettings

    values = effective_values(profile)
    service = one(docs_of(profile), "RayService")
    rendered = yaml.safe_load(service["spec"]["serveConfigV2"])
    expected = yaml.safe_load((JOB_CONFIGS / "serve.yaml").read_text())
    expected["http_options"].update(values["serve"]["http"])
    for app in expected["applications"]:
        app["args"].update(values["serve"]["args"])
    assert rendered == expected
    assert rendered["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert all(ServeSettings.model_validate(app["args"]) for app in rendered["applications"])
    assert service["spec"]["upgradeStrategy"] == {"type": "NewCluster"}


def test_serve_args_override_zero_values() -> None:
    values = {"serve": {"enabled": True, "args": {"min_replicas": 0, "max_draws": 20000000}}}
    docs = render_docs(values)
    (app,) = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])["applications"]
    assert (app["args"]["min_replicas"], app["args"]["max_draws"]) == (0, 20000000)


def test_serve_pods_expose_the_serve_port() -> None:
    service = one(docs_of("gpu"), "RayService")
    ports = {
        group: {p["name"]: p["containerPort"] for p in t["spec"]["containers"][0].get("ports", [])}
        for group, t in groups(service["spec"]["rayClusterConfig"]).items()
    }
    assert {group: p.get("serve") for group, p in ports.items()} == {
        "head": 8000,
        "cpu": 8000,
        "gpu": 8000,
    }


# ------------------------------------------------------------------------------ RayJobs


def declared_flags(job: str) -> set[str]:
    flags = set()
    for source in JOB_SOURCES[job]:
        tree = ast.parse((ROOT / "jobs" / source).read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"
            ):
                flags |= {
                    a.value
                    for a in node.args
                    if isinstance(a, ast.Constant) and str(a.value).startswith("--")
                }
    return flags


def rayjobs(profile: str) -> list[tuple[str, dict]]:
    return [
        (d["metadata"]["labels"]["cloudburst.io/job"], d)
        for d in of_kind(docs_of(profile), "RayJob")
    ]


JOB_CASES = [(p, job) for p in PROFILES for job, _ in rayjobs(p)]


def test_profiles_cover_every_job() -> None:
    assert {job for _, job in JOB_CASES} == set(JOB_SOURCES)


@pytest.mark.parametrize(("profile", "job"), JOB_CASES)
def test_rayjob_entrypoint_is_a_valid_command_line_of_the_job(profile: str, job: str) -> None:
    (doc,) = [d for j, d in rayjobs(profile) if j == job]
    argv = shlex.split(doc["spec"]["entrypoint"])
    flags = [a for a in argv[2:] if a.startswith("--")]
    assert argv[:2] == ["python", f"jobs/{job}.py"]
    assert (ROOT / argv[1]).is_file()
    assert set(flags) <= declared_flags(job)
    assert doc["metadata"]["name"] == f"{RELEASE}-{job}"


@pytest.mark.parametrize(("profile", "job"), [c for c in JOB_CASES if c[1] in ("train", "sweep")])
def test_rayjob_configs_exist_in_the_repo(profile: str, job: str) -> None:
    (doc,) = [d for j, d in rayjobs(profile) if j == job]
    argv = shlex.split(doc["spec"]["entrypoint"])
    config = Path(argv[argv.index("--config") + 1])
    overrides = argv[4:]
    expected = effective_values(profile)["jobs"][job]
    assert argv[2] == "--config" and str(config.parent) == CONFIGS_MOUNT
    assert config.name == expected["config"]
    assert (JOB_CONFIGS / config.name).is_file()
    assert overrides[: len(expected["overrides"])] == expected["overrides"]
    assert all(re.match(r"^[A-Za-z_][\w.]*=", o) for o in overrides)


@pytest.mark.parametrize("profile", [p for p, job in JOB_CASES if job == "sweep"])
def test_sweep_base_comes_from_the_mounted_configs(profile: str) -> None:
    (doc,) = [d for j, d in rayjobs(profile) if j == "sweep"]
    argv = shlex.split(doc["spec"]["entrypoint"])
    sweep = yaml.safe_load((JOB_CONFIGS / Path(argv[3]).name).read_text())
    base = Path(sweep["base"]).name
    assert argv[-1] == f"base={CONFIGS_MOUNT}/{base}"
    assert (JOB_CONFIGS / base).is_file()


def test_ensemble_request_is_a_valid_request() -> None:
    from cloudburst.ensembles.request import EnsembleRequest

    docs = docs_of("cpu-only")
    (doc,) = [d for j, d in rayjobs("cpu-only") if j == "ensemble"]
    argv = shlex.split(doc["spec"]["entrypoint"])
    configmap = one(docs, "ConfigMap", f"{RELEASE}-requests")
    request = yaml.safe_load(configmap["data"]["ensemble.yaml"])
    assert argv[2:] == ["--request", f"{REQUESTS_MOUNT}/ensemble.yaml", "--workers", "4"]
    assert request == effective_values("cpu-only")["jobs"]["ensemble"]["request"]
    assert EnsembleRequest.model_validate(request).members == 10000


def test_evaluate_flags_from_values() -> None:
    (doc,) = [d for j, d in rayjobs("cpu-only") if j == "evaluate"]
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[2:] == [
        "--model",
        "models:/cloudburst-vae-fraser@candidate",
        "--data",
        "s3://cloudburst-data/fraser/precip.zarr",
        "--split",
        "test",
        "--out",
        "s3://cloudburst-data/evaluation/fraser",
        "--limit",
        "500",
    ]


@pytest.mark.parametrize(("profile", "job"), JOB_CASES)
def test_the_cluster_running_a_job_mounts_the_configs(profile: str, job: str) -> None:
    docs = docs_of(profile)
    (doc,) = [d for j, d in rayjobs(profile) if j == job]
    if "clusterSelector" in doc["spec"]:
        name = doc["spec"]["clusterSelector"]["ray.io/cluster"]
        spec = one(docs, "RayCluster", name)["spec"]
    else:
        spec = doc["spec"]["rayClusterSpec"]
    head = groups(spec)["head"]["spec"]
    configmap = one(docs, "ConfigMap", f"{RELEASE}-configs")
    volumes = {v["name"]: v for v in head["volumes"]}
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == CONFIGS_MOUNT]
    assert volumes[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]


def test_jobs_on_the_long_lived_cluster_use_its_selector() -> None:
    docs = docs_of("cpu-only")
    cluster = one(docs, "RayCluster")
    specs = {job: d["spec"] for job, d in rayjobs("cpu-only")}
    assert set(specs) == {"train", "ensemble", "evaluate"}
    assert {job: s["clusterSelector"] for job, s in specs.items()} == {
        job: {"ray.io/cluster": cluster["metadata"]["name"]} for job in specs
    }
    assert [
        job
        for job, s in specs.items()
        if {"rayClusterSpec", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished"} & set(s)
    ] == []


def test_jobs_with_their_own_cluster_shut_it_down() -> None:
    specs = {job: d["spec"] for job, d in rayjobs("gpu")}
    summary = {
        job: (
            s["submissionMode"],
            s["shutdownAfterJobFinishes"],
            s["ttlSecondsAfterFinished"],
            "clusterSelector" in s,
        )
        for job, s in specs.items()
    }
    assert summary == {
        "train": ("K8sJobMode", True, 600, False),
        "sweep": ("K8sJobMode", True, 600, False),
    }


# ------------------------------------------------------------------------------ configs


def test_chart_configs_are_the_repo_job_configs_byte_for_byte() -> None:
    chart_files = {p.name: p.read_bytes() for p in (CHART / "configs").glob("*.yaml")}
    repo_files = {p.name: p.read_bytes() for p in JOB_CONFIGS.glob("*.yaml")}
    assert sorted(chart_files) == sorted(repo_files)
    drifted = sorted(name for name in repo_files if chart_files.get(name) != repo_files[name])
    assert drifted == [], f"copy jobs/configs/{{{','.join(drifted)}}} to helm/cloudburst/configs/"


def test_configmap_holds_every_job_config() -> None:
    configmap = one(docs_of("default"), "ConfigMap", f"{RELEASE}-configs")
    repo_files = {p.name: p.read_text() for p in JOB_CONFIGS.glob("*.yaml")}
    assert configmap["data"] == repo_files


# ------------------------------------------------------------------------------ values


def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def open_objects(node: Any, path: str = "") -> Iterator[str]:
    """Paths of object schemas that declare properties but accept undeclared keys."""
    if isinstance(node, dict):
        if "properties" in node and node.get("additionalProperties") is not False:
            yield path or "<root>"
        for key, value in node.items():
            yield from open_objects(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from open_objects(value, f"{path}[{i}]")


def test_schema_is_draft7_and_closed_at_every_level() -> None:
    s = schema()
    jsonschema.Draft7Validator.check_schema(s)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert s["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert list(open_objects(s)) == []
    assert list(jsonschema.Draft7Validator(s).iter_errors(defaults)) == []
    assert sorted(s["properties"]) == sorted(defaults)


@pytest.mark.parametrize("profile", PROFILES[1:])
def test_profiles_match_the_schema(profile: str) -> None:
    errors = jsonschema.Draft7Validator(schema()).iter_errors(effective_values(profile))
    assert [e.message for e in errors] == []


MISSPELT = [
    ({"workers": {"cpu": {"replicas": 2, "minReplica": 1}}}, "minReplica"),
    ({"wrokers": {"cpu": {"replicas": 2}}}, "wrokers"),
    ({"head": {"schedulable": "no"}}, "schedulable"),
    ({"jobs": {"submissionMode": "K8sMode"}}, "submissionMode"),
    ({"jobs": {"train": {"config": "../../etc/passwd"}}}, "config"),
    ({"workers": {"gpu": {"gpus": 0}}}, "gpus"),
    ({"serve": {"upgradeStrategy": {"type": "Rolling"}}}, "type"),
    ({"serve": {"args": {"max_member": 10}}}, "max_member"),
    ({"env": {"AWS_SECRET_ACCESS_KEY": "literal"}}, "AWS_SECRET_ACCESS_KEY"),
    ({"serve": {"args": {"api_key": "literal"}}}, "api_key"),
    ({"serve": {"args": {"storage_options": {"secret": "literal"}}}}, "secret"),
    ({"mlflow": {"database": {"external": {"url": "postgresql://u:pw@db:5432/m"}}}}, "url"),
]


@pytest.mark.parametrize(("values", "name"), MISSPELT, ids=[n for _, n in MISSPELT])
def test_schema_refuses_misspelt_or_unsafe_values(values: dict, name: str) -> None:
    with pytest.raises(helm.HelmValuesError) as refused:
        render_values(values)
    errors = list(
        jsonschema.Draft7Validator(schema()).iter_errors(
            merged(effective_values("default"), values)
        )
    )
    assert name in str(refused.value)
    assert errors != []


GUARDS = [
    (
        {"rayCluster": {"enabled": False}, "jobs": {"useExistingCluster": True}},
        "rayCluster.enabled",
    ),
    ({"jobs": {"train": {"enabled": True, "config": "missing.yaml"}}}, "missing.yaml"),
    (
        {
            "jobs": {
                "shutdownAfterJobFinishes": False,
                "ttlSecondsAfterFinished": 60,
                "train": {"enabled": True},
            }
        },
        "ttlSecondsAfterFinished",
    ),
    (
        {
            "jobs": {
                "useExistingCluster": True,
                "submissionMode": "SidecarMode",
                "train": {"enabled": True},
            }
        },
        "SidecarMode",
    ),
    ({"workers": {"cpu": {"minReplicas": 5, "maxReplicas": 2}}}, "minReplicas"),
    ({"jobs": {"ensemble": {"enabled": True}}}, "jobs.ensemble.request.model"),
    ({"jobs": {"evaluate": {"enabled": True, "models": ["models:/m@a"]}}}, "jobs.evaluate.data"),
    ({"mlflow": {"database": {"mode": "external"}}}, "mlflow.database.external.url"),
    ({"mlflow": {"enabled": False}}, "mlflow.trackingUri"),
]


@pytest.mark.parametrize(("values", "needle"), GUARDS, ids=[n for _, n in GUARDS])
def test_inconsistent_values_fail_with_a_message(values: dict, needle: str) -> None:
    with pytest.raises(helm.HelmError) as failed:
        render_values(values)
    assert needle in str(failed.value)


def test_release_names_kuberay_cannot_take_are_refused() -> None:
    with pytest.raises(helm.HelmError) as failed:
        render_values({}, name="9lives")
    assert "must start with a letter" in str(failed.value)


def test_every_values_field_has_a_comment_above() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z][\w.-]*:", line):
            above = lines[i - 1].strip() if i else ""
            if not above.startswith("#"):
                undocumented.append(line.strip())
    assert undocumented == []


def test_values_document_workload_identity_annotations() -> None:
    text = (CHART / "values.yaml").read_text()
    assert "iam.gke.io/gcp-service-account" in text
    assert "eks.amazonaws.com/role-arn" in text


# ------------------------------------------------------------------------------ NOTES


def test_notes_tell_how_to_submit_track_and_call() -> None:
    notes = notes_of("gpu")
    assert f"port-forward svc/{RELEASE}-head-svc 8265:8265" in notes
    assert "ray job submit --address http://127.0.0.1:8265" in notes
    assert f"port-forward svc/{RELEASE}-mlflow 5000:5000" in notes
    assert f"port-forward svc/{RELEASE}-serve-serve-svc 8000:8000" in notes
    assert 'curl -s -H "X-API-Key: $CLOUDBURST_API_KEY" http://127.0.0.1:8000/v1/models' in notes


def test_notes_without_the_long_lived_cluster_point_at_rayjobs() -> None:
    out = render_values({"rayCluster": {"enabled": False}})
    notes = "".join(v for k, v in out.items() if k.endswith("NOTES.txt"))
    assert "--set jobs.train.enabled=true" in notes
    assert "head-svc" not in notes
