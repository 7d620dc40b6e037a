"""Kubernetes manifests (k8s/): every kustomization renders, every rendered object validates offline
against the pinned Kubernetes API schema (kubernetes-validate, strict: unknown fields are errors), and
the settings, probes, security context and volumes say what docs/deployment.md says they do.

Rendering uses the real kustomize: ``kustomize build`` if installed, else ``kubectl kustomize``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes these manifests are meant for; see docs/deployment.md
KUSTOMIZATIONS = sorted(p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml"))


def _renderer() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render(kustomization: str) -> list[dict]:
    command = _renderer()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed: cannot render k8s/ (install either to run this)")
    result = subprocess.run([*command, str(K8S / kustomization)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} k8s/{kustomization} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(pod_spec: dict, name: str) -> dict:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def settings_fields() -> set[str]:
    from service.settings import Settings

    return {f"CAPTIONER_{name.upper()}" for name in Settings.model_fields}


# ---------------------------------------------------------------------------------------------- layout
def test_expected_kustomizations_exist():
    for expected in ("base", "overlays/cpu", "overlays/gpu", "jobs/train", "jobs/batch", "jobs/batch-merge"):
        assert expected in KUSTOMIZATIONS, f"k8s/{expected}/kustomization.yaml is missing"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_and_validates_strictly(kustomization):
    docs = render(kustomization)
    assert docs, f"k8s/{kustomization} renders nothing"
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):  # KubeRay custom resources: tests/test_deploy_k8s_ray.py
            continue
        where = f"k8s/{kustomization}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError as exc:  # an unknown kind is a failure here, not a warning
            pytest.fail(f"{where}: {exc.message}")
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where}: {path}: {exc.message}")


def test_validation_catches_a_broken_manifest():
    """The strict validation above is not a rubber stamp: a misspelt field and a wrong type both fail."""
    docs = render("base")
    deployment = one(docs, "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# ---------------------------------------------------------------------------------------------- serving
@pytest.fixture(scope="module", params=["base", "overlays/cpu", "overlays/gpu"])
def serving(request):
    return request.param, render(request.param)


def test_serving_objects_present(serving):
    name, docs = serving
    kinds = sorted({d["kind"] for d in docs})
    for kind in ("ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
                 "PodDisruptionBudget", "Service"):
        assert kind in kinds, f"k8s/{name} lacks a {kind}"
    assert not by_kind(docs, "Job"), f"k8s/{name}: Jobs belong in k8s/jobs (created on demand, not with the app)"


def test_settings_configmap_is_valid_service_settings(serving):
    """Every key is a real CAPTIONER_* setting and the values parse with the service's own Settings class."""
    from service.settings import Settings

    name, docs = serving
    deployment = one(docs, "Deployment", "captioner")
    api = container(deployment["spec"]["template"]["spec"], "api")
    refs = [e["configMapRef"]["name"] for e in api["envFrom"] if "configMapRef" in e]
    assert len(refs) == 1
    configmap = one(docs, "ConfigMap", refs[0])  # the generated name (with hash) is what the pod references
    data = configmap["data"]
    unknown = set(data) - settings_fields()
    assert not unknown, f"k8s/{name}: ConfigMap keys that service/settings.py does not read: {sorted(unknown)}"
    settings = Settings(**{k.removeprefix("CAPTIONER_").lower(): v for k, v in data.items()}, _env_file=None)
    assert settings.host == "0.0.0.0"
    assert str(settings.model_store) == "/models"
    # the thread budget matches the CPU the pod may use (torch would otherwise size itself to the node)
    cpu_limit = api["resources"]["limits"].get("cpu")
    if cpu_limit is not None:
        assert settings.cpu_budget <= _cpus(cpu_limit)
        on_gpu = "nvidia.com/gpu" in api["resources"]["limits"]  # one replica per model there (auto)
        for kind, task in (("caption", "lightcap"), ("caption", "ucm-captioner"), ("labels", None), ("concepts", None)):
            replicas = 1 if on_gpu else settings.replicas_for(kind, task)
            threads = settings.threads_for(kind, task)
            # threads share the pod's CPUs; only LightCap oversubscribes them, by one 1-thread replica (measured)
            assert threads * min(replicas, _cpus(cpu_limit)) <= _cpus(cpu_limit), (kind, task)
    # graceful shutdown fits in the termination grace period after the preStop pause
    pod = deployment["spec"]["template"]["spec"]
    pre_stop = api["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert float(pre_stop[1]) + settings.shutdown_timeout_s < pod["terminationGracePeriodSeconds"]
    # keys never travel in the ConfigMap; they come from the optional Secret
    assert "CAPTIONER_API_KEY" not in data and "CAPTIONER_ADMIN_KEY" not in data
    secrets = [e["secretRef"] for e in api["envFrom"] if "secretRef" in e]
    assert secrets == [{"name": "captioner-keys", "optional": True}]


def _cpus(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_deployment_probes_security_and_volumes(serving):
    name, docs = serving
    deployment = one(docs, "Deployment", "captioner")
    pod = deployment["spec"]["template"]["spec"]
    api = container(pod, "api")
    port = api["ports"][0]
    assert port["containerPort"] == 8000 and port["name"] == "http"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert api[probe]["httpGet"]["port"] in ("http", 8000)
    assert api["resources"]["requests"] and api["resources"]["limits"]["memory"]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, f"{c['name']}: root filesystem must be read-only"
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]

    # read-only root: every path the service writes is a volume (/tmp, the data dir), the store is mounted
    mounts = {m["mountPath"]: m for m in api["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    configmap = one(docs, "ConfigMap", next(e["configMapRef"]["name"] for e in api["envFrom"] if "configMapRef" in e))
    data_dir = configmap["data"]["CAPTIONER_DATA_DIR"]
    store = configmap["data"]["CAPTIONER_MODEL_STORE"]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert "emptyDir" in volumes[mounts[data_dir]["name"]]
    store_volume = volumes[mounts[store]["name"]]
    assert store_volume["persistentVolumeClaim"]["claimName"] == "captioner-model-store"
    assert mounts[store].get("readOnly") is True, "the API only reads the store"
    pvcs = {p["metadata"]["name"] for p in by_kind(docs, "PersistentVolumeClaim")}
    assert "captioner-model-store" in pvcs

    # the init container seeds that same claim from the image's embedded store
    seed = next(c for c in pod["initContainers"] if c["name"] == "seed-model-store")
    assert seed["command"][:2] == ["python", "/opt/captioner/seed_store.py"]
    seed_mounts = {m["mountPath"]: m["name"] for m in seed["volumeMounts"]}
    assert seed_mounts[seed["command"][3]] == mounts[store]["name"]
    assert seed["command"][2] == store, "source = where the image embeds the store (not shadowed in the init container)"


def test_service_hpa_pdb_select_the_deployment(serving):
    name, docs = serving
    deployment = one(docs, "Deployment", "captioner")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service", "captioner")
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert service["spec"]["ports"][0]["targetPort"] in ("http", 8000)
    pdb = one(docs, "PodDisruptionBudget")
    assert all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())
    hpa = one(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "captioner")
    assert hpa["spec"]["minReplicas"] >= 2, "a PDB with minAvailable 1 needs 2+ replicas to allow node drains"
    assert int(pdb["spec"]["minAvailable"]) < hpa["spec"]["minReplicas"]
    # HPA on CPU utilisation needs CPU requests
    assert container(deployment["spec"]["template"]["spec"], "api")["resources"]["requests"]["cpu"]


def test_overlays_pick_their_image_and_devices():
    cpu = one(render("overlays/cpu"), "Deployment", "captioner")
    gpu = one(render("overlays/gpu"), "Deployment", "captioner")
    cpu_api = container(cpu["spec"]["template"]["spec"], "api")
    gpu_api = container(gpu["spec"]["template"]["spec"], "api")
    assert cpu_api["image"].endswith(":cpu") and gpu_api["image"].endswith(":gpu")
    # every container of a pod runs the same image (the init container seeds from the image it ships)
    for deployment in (cpu, gpu):
        pod = deployment["spec"]["template"]["spec"]
        assert len({c["image"] for c in pod["containers"] + pod["initContainers"]}) == 1
    assert "nvidia.com/gpu" not in cpu_api["resources"].get("limits", {})
    assert gpu_api["resources"]["limits"]["nvidia.com/gpu"] == 1


# ---------------------------------------------------------------------------------------------- jobs
def _env(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def test_training_job_runs_torchrun_and_publishes_to_the_store():
    docs = render("jobs/train")
    job = one(docs, "Job", "captioner-train")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    train = container(pod, "train")
    env = _env(train)
    script = train["args"][0]
    assert train["command"][0] == "bash"
    assert "torchrun" in script and "captioner train" in script and "--store" in script
    # nodes: an Indexed Job whose index is the torchrun node rank; pod 0 reachable through the headless svc
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["NNODES"]["value"])
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    service = one(docs, "Service", "captioner-train")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == service["metadata"]["name"]
    assert env["MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    # publishes into the same claim the API serves from, under the path the store setting names
    mounts = {m["mountPath"]: m["name"] for m in train["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    store_path = env["CAPTIONER_MODEL_STORE"]["value"]
    assert volumes[mounts[store_path]]["persistentVolumeClaim"]["claimName"] == "captioner-model-store"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert train["securityContext"]["readOnlyRootFilesystem"] is True


def test_batch_job_shards_match_completions():
    job = one(render("jobs/batch"), "Job", "captioner-batch")
    spec = job["spec"]
    batch = container(spec["template"]["spec"], "batch")
    env = _env(batch)
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == int(env["SHARDS"]["value"]), "SHARDS must equal completions"
    assert "job-completion-index" in env["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    words = batch["command"] + batch.get("args", [])
    assert words[:2] == ["captioner", "batch"]
    assert "--shard" in words and words[words.index("--shard") + 1] == "$(SHARD_INDEX)/$(SHARDS)"
    out = words[words.index("--out") + 1]
    assert "$(SHARD_INDEX)" in out, "each pod writes its own JSONL"
    # the merge Job reads the same shards from the same place
    merge = container(one(render("jobs/batch-merge"), "Job", "captioner-batch-merge")["spec"]["template"]["spec"], "merge")
    merge_env = _env(merge)
    for name in ("SHARDS", "INPUT", "OUTPUT_DIR"):
        assert merge_env[name]["value"] == env[name]["value"], f"{name} differs between batch and batch-merge"
    assert "captioner batch-merge" in merge["args"][0]


@pytest.mark.parametrize("kustomization", ["jobs/train", "jobs/batch", "jobs/batch-merge", "overlays/gpu/train"])
def test_jobs_run_one_image_hardened(kustomization):
    for job in by_kind(render(kustomization), "Job"):
        pod = job["spec"]["template"]["spec"]
        images = {c["image"] for c in pod["containers"] + pod.get("initContainers", [])}
        assert len(images) == 1 and images.pop().startswith("captioner:"), f"k8s/{kustomization}: {images}"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["resources"]["limits"]["memory"]
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts, f"{c['name']}: read-only root needs a writable /tmp"


def test_job_variable_references_are_defined():
    """Every $(VAR) in a container's command/args/env is defined earlier in that container's env, as
    Kubernetes requires (an undefined reference is passed through literally, silently)."""
    for kustomization in KUSTOMIZATIONS:
        for doc in render(kustomization):
            pod = doc.get("spec", {}).get("template", {}).get("spec")
            if not pod:
                continue
            for c in pod["containers"] + pod.get("initContainers", []):
                defined: list[str] = []
                for e in c.get("env", []):
                    for ref in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(e.get("value", ""))):
                        assert ref in defined, f"k8s/{kustomization} {c['name']}: env {e['name']} uses $({ref}) before it is defined"
                    defined.append(e["name"])
                for word in c.get("command", []) + c.get("args", []):
                    for ref in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", word):
                        assert ref in defined, f"k8s/{kustomization} {c['name']}: $({ref}) is not in its env"
