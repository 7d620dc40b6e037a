"""k8s/jobs/ray: the KubeRay RayJob, validated offline like the other manifests (tests/test_deploy_k8s.py).

* the RayJob validates against the vendored, pinned KubeRay v1.7.0 RayJob schema (k8s/schemas/kuberay), with
  unknown fields refused as ``kubectl apply --validate=strict`` would;
* every pod template in it (head, each worker group) validates strictly against the pinned Kubernetes schema
  (kubernetes-validate, as a ``v1/PodTemplate``);
* the entrypoint parses with the real ``captioner`` command line, runs the Ray engine, and the cluster it
  asks for fits what the worker groups offer (GPUs per actor x actors, volumes, the store path).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from test_deploy_k8s import KUBERNETES_VERSION, container, one, render

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_DIR = ROOT / "k8s" / "schemas" / "kuberay"
KUBERAY_VERSION = "v1.7.0"


def strict(schema):
    """The CRD schema with unknown fields refused: every object schema that lists its properties and does not
    preserve unknown fields gets ``additionalProperties: false`` (what the API server's strict field
    validation does with a structural schema)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validator():
    schema = json.loads((SCHEMA_DIR / "rayjob-v1.json").read_text())
    return jsonschema.Draft7Validator(strict(schema))


@pytest.fixture(scope="module")
def rayjob():
    return one(render("jobs/ray"), "RayJob", "captioner-batch-ray")


def pod_templates(job: dict) -> dict[str, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return out


def entrypoint_args(job: dict):
    from captioning.cli import build_parser

    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["captioner", "batch"], "the same command as the local batch and the Indexed Job"
    return build_parser().parse_args(words[1:])


# ---------------------------------------------------------------------------------------------- schema
def test_vendored_schema_is_the_pinned_release_with_its_licence():
    schema = json.loads((SCHEMA_DIR / "rayjob-v1.json").read_text())
    assert f"KubeRay {KUBERAY_VERSION}" in schema["$comment"]
    assert {"apiVersion", "kind", "metadata", "spec", "status"} <= set(schema["properties"])
    assert "Apache License" in (SCHEMA_DIR / "LICENSE").read_text()
    assert KUBERAY_VERSION in (SCHEMA_DIR / "README.md").read_text()


def test_rayjob_validates_against_the_kuberay_schema(rayjob, validator):
    errors = sorted(validator.iter_errors(rayjob), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    assert rayjob["apiVersion"] == "ray.io/v1"
    # the schema's CEL rules (x-kubernetes-validations) are not evaluated offline: they only guard these fields
    assert not {"deletionStrategy", "managedBy"} & set(rayjob["spec"])
    assert "gcsFaultToleranceOptions" not in rayjob["spec"]["rayClusterSpec"]


def test_schema_validation_catches_a_broken_rayjob(rayjob, validator):
    broken = yaml.safe_load(yaml.safe_dump(rayjob))
    broken["spec"]["shutdownAfterJobFinish"] = True  # misspelt
    assert not validator.is_valid(broken)
    broken = yaml.safe_load(yaml.safe_dump(rayjob))
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert not validator.is_valid(broken)
    broken = yaml.safe_load(yaml.safe_dump(rayjob))
    del broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["groupName"]
    assert not validator.is_valid(broken)
    broken = yaml.safe_load(yaml.safe_dump(rayjob))
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "x"
    assert not validator.is_valid(broken)


@pytest.mark.parametrize("group", ["head", "cpu", "gpu"])
def test_pod_templates_validate_strictly_as_kubernetes_objects(rayjob, group):
    template = pod_templates(rayjob)[group]
    doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"captioner-batch-ray-{group}"},
           "template": template}
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{group}: {'.'.join(str(p) for p in exc.path)}: {exc.message}")


# ---------------------------------------------------------------------------------------------- meaning
def test_rayjob_runs_the_ray_engine_and_cleans_up(rayjob):
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    args = entrypoint_args(rayjob)
    assert args.engine == "ray" and args.address == "auto", "the driver joins the RayJob's own cluster"
    assert args.format in (None, "parquet", "jsonl")
    import ray

    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__, "rayVersion = the Ray the project locks"


def test_worker_groups_cpu_and_gpu_fit_the_actor_pool(rayjob):
    args = entrypoint_args(rayjob)
    groups = {g["groupName"]: g for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for name, group in groups.items():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
    gpu = container(groups["gpu"]["template"]["spec"], "ray-worker")
    cpu = container(groups["cpu"]["template"]["spec"], "ray-worker")
    gpus_per_pod = int(gpu["resources"]["limits"]["nvidia.com/gpu"])
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert args.num_gpus and args.num_gpus > 0, "the actors run on the GPU group"
    assert args.actors * args.num_gpus <= groups["gpu"]["replicas"] * gpus_per_pod, "every actor gets its GPUs"
    assert gpu["image"] == "captioner:gpu" and cpu["image"] == "captioner:cpu"
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head only drives (no tasks next to the writer)"
    assert container(head["template"]["spec"], "ray-head")["image"] == "captioner:cpu"


def test_volumes_store_and_paths(rayjob):
    args = entrypoint_args(rayjob)
    for group, template in pod_templates(rayjob).items():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["model-store"]["persistentVolumeClaim"]["claimName"] == "captioner-model-store"
        assert volumes["work"]["persistentVolumeClaim"]["claimName"] == "captioner-work"
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory", "Ray's object store needs a real /dev/shm"
        main = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in main.get("env", [])}
        mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
        assert mounts[env["CAPTIONER_MODEL_STORE"]]["name"] == "model-store", group
        assert mounts[env["CAPTIONER_MODEL_STORE"]].get("readOnly") is True, group
        assert {"/tmp", "/dev/shm"} <= set(mounts), group
        assert main["securityContext"]["readOnlyRootFilesystem"] is True, group
        assert main["resources"]["limits"]["memory"], group
        # the input is read where tasks run (every group); the head (the driver) writes --out
        work = next(p for p, m in mounts.items() if m["name"] == "work")
        assert str(args.dir).startswith(work + "/"), group
        if group == "head":
            assert str(args.out).startswith(work + "/") and not mounts[work].get("readOnly")
    # the head seeds the store claim from the image, as the Indexed Job's pods do
    head = pod_templates(rayjob)["head"]["spec"]
    seed = next(c for c in head["initContainers"] if c["name"] == "seed-model-store")
    assert seed["command"][:2] == ["python", "/opt/captioner/seed_store.py"]
