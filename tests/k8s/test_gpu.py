"""The GPU deployment, offline: docker/Dockerfile.gpu (hadolint, pins, user, what it
installs against what the inference process imports with every backend), the `tensorrt`
extra, and overlays/gpu as rendered (GPU requests, GPU nodes only, the backend settings,
the TensorRT engine cache on a volume at the configured path, the CUDA image).

NOT RUN: no image here was built and nothing ran on a GPU or a cluster; these checks are
what can be known without one. overlays/gpu also goes through every check of
test_render.py, test_policy.py and test_kafka.py (it is in OVERLAYS)."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from services.inference.settings import InferenceSettings
from tests.k8s.manifests import (
    GPU_IMAGE,
    IMAGE_MODEL_REPOSITORY,
    OPTIONAL_MODULES,
    REPO,
    Manifests,
    Obj,
    closure,
    distribution_of,
    entry_module,
    import_graph,
    load_settings,
    pod_spec,
    requirements,
)
from tests.k8s.test_images import (
    DOCKER,
    global_args,
    hadolint,
    lineage,
    project_dependencies,
    pyproject,
    stages,
)

GPU_DOCKERFILE = DOCKER / "Dockerfile.gpu"
GPU_REQUIREMENTS = DOCKER / "requirements-gpu.txt"
GPU_RESOURCE = "nvidia.com/gpu"
#: The CUDA builds the GPU image installs in place of, or beside, the runtime set.
CUDA_PACKAGES = {"onnxruntime-gpu", "tensorrt"}


def constraints() -> dict[str, str]:
    return {
        canonicalize_name(line.split("==")[0]): line.split("==")[1].strip()
        for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines()
        if "==" in line and not line.startswith("#")
    }


def pinned(path: Path) -> dict[str, Requirement]:
    """Requirements of a file that carry a version."""
    found: dict[str, Requirement] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-") and "==" in line:
            requirement = Requirement(line)
            found[canonicalize_name(requirement.name)] = requirement
    return found


def exact(requirement: Requirement) -> str:
    (version,) = [spec.version for spec in requirement.specifier if spec.operator == "=="]
    return version


def tensorrt_extra() -> dict[str, Requirement]:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    extra = project["optional-dependencies"]["tensorrt"]
    return {canonicalize_name(Requirement(text).name): Requirement(text) for text in extra}


# --- the image ------------------------------------------------------------------------------


def test_gpu_dockerfile_passes_hadolint() -> None:
    result = hadolint(GPU_DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_image_is_a_pinned_cuda_runtime_and_runs_as_the_images_user() -> None:
    gpu_stages = stages(GPU_DOCKERFILE)
    chain = lineage("gpu", GPU_DOCKERFILE)
    base = chain[-1].base
    cuda_runtime = r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(cudnn-)?runtime-ubuntu\d+\.\d+(@sha256:[0-9a-f]{64})?"
    match = re.fullmatch(cuda_runtime, base)
    assert match, f"the GPU image's base {base} is not an NVIDIA CUDA runtime image pinned to a patch release"
    users = [user for stage in chain for user in stage.all("USER")]
    cpu_users = {user for stage in lineage("runtime") + lineage("explainer") for user in stage.all("USER")}
    assert users and set(users) == cpu_users, f"GPU image USER {users}, CPU images {cpu_users}"
    # The CPU images it copies from are build arguments defaulting to the tags k8s/ deploys.
    arguments = global_args(GPU_DOCKERFILE)
    base_images = {stage.base for stage in gpu_stages.values() if stage.base.startswith("${")}
    assert base_images == {"${RUNTIME_IMAGE}", "${EXPLAINER_IMAGE}"}
    assert arguments["RUNTIME_IMAGE"].startswith("infermesh:")
    assert arguments["EXPLAINER_IMAGE"].startswith("infermesh-explainer:")
    copies = gpu_stages["gpu"].all("COPY")
    assert f"--from=cpu-explainer {IMAGE_MODEL_REPOSITORY}/ {IMAGE_MODEL_REPOSITORY}/" in copies
    assert "--from=cpu-runtime /app/ /app/" in copies
    python = re.search(r"python(3\.\d+) -m venv", " ".join(gpu_stages["gpu-deps"].all("RUN")))
    assert python, "the GPU image's venv is made with a versioned python"
    for copy in copies:
        if "site-packages" in copy:
            assert copy.split()[-1].startswith(f"/opt/venv/lib/python{python[1]}/site-packages/"), copy


def test_gpu_image_installs_the_projects_torch_pin_as_the_cuda_build_of_its_base() -> None:
    base = lineage("gpu", GPU_DOCKERFILE)[-1].base
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)", base)
    assert cuda
    torch_pin = exact(project_dependencies()["torch"])
    runs = " ".join(run for stage in lineage("gpu-deps", GPU_DOCKERFILE) for run in stage.all("RUN"))
    installs = re.findall(r"pip install [^&]*torch[^&]*", runs)
    assert installs
    for install in installs:
        assert f"torch=={torch_pin}" in install, install
        if "--index-url" in install:
            assert f"--index-url https://download.pytorch.org/whl/cu{cuda[1]}{cuda[2]} " in install, (
                f"{install}: not the CUDA {cuda[1]}.{cuda[2]} wheels of the base image"
            )
    assert "-c /tmp/req/constraints.txt" in runs and "-r /tmp/req/requirements-gpu.txt" in runs


def test_the_tensorrt_extra_carries_the_projects_torch() -> None:
    extra = tensorrt_extra()
    assert set(extra) == {"tensorrt", "torch"}
    assert exact(extra["torch"]) == exact(project_dependencies()["torch"])


def test_gpu_requirements_follow_the_runtime_set_with_the_cuda_builds() -> None:
    runtime = set(requirements(DOCKER / "requirements-runtime.txt"))
    gpu = set(requirements(GPU_REQUIREMENTS))
    assert gpu == (runtime - {"onnxruntime"}) | {"transformers"} | CUDA_PACKAGES
    pins = pinned(GPU_REQUIREMENTS)
    assert set(pins) == CUDA_PACKAGES, "only the CUDA builds are pinned here; constraints.txt pins the rest"
    pinned_by_constraints = constraints()
    for name in gpu - CUDA_PACKAGES:
        assert name in project_dependencies() and name in pinned_by_constraints, name
    assert exact(pins["onnxruntime-gpu"]) == pinned_by_constraints["onnxruntime"], (
        "onnxruntime-gpu must be the onnxruntime release the project is tested with"
    )
    assert tensorrt_extra()["tensorrt"].specifier.contains(exact(pins["tensorrt"]))


def test_gpu_image_installs_what_inference_imports_with_every_backend() -> None:
    """Every third-party import of `python -m services.inference`, the torch and TensorRT
    backends included. onnxruntime-gpu provides the `onnxruntime` module (checked through
    the installed CPU onnxruntime's dependencies); TensorRT is not installable here, so its
    imports are checked by name."""
    names = [name for name in requirements(GPU_REQUIREMENTS) if name not in CUDA_PACKAGES]
    installed = closure([*names, "onnxruntime", "torch"])
    module = "services.inference"
    assert set(OPTIONAL_MODULES) <= import_graph(entry_module(module), optional=True)[0]
    for name in sorted(import_graph(entry_module(module), optional=True)[1]):
        if name.split(".")[0] == "tensorrt":
            assert "tensorrt" in requirements(GPU_REQUIREMENTS)
            continue
        distribution = distribution_of(name)
        assert distribution is not None, f"{module} imports {name}, which no installed distribution provides"
        if distribution:
            assert distribution in installed, f"{module} imports {name} ({distribution}); the GPU image lacks it"


def test_the_gpu_build_context_holds_what_the_gpu_dockerfile_copies() -> None:
    sources = {
        source
        for stage in stages(GPU_DOCKERFILE).values()
        for copy in stage.all("COPY")
        if not copy.startswith("--from=")
        for source in copy.split()[:-1]
    }
    assert sources == {"constraints.txt", "docker/requirements-gpu.txt"}
    ignore = (REPO / ".dockerignore").read_text(encoding="utf-8")
    assert "!constraints.txt" in ignore and "!docker/requirements-*.txt" in ignore


# --- the overlay ----------------------------------------------------------------------------


def gpu_pods(manifests: Manifests) -> list[tuple[Obj, Obj]]:
    """(Deployment, container) of every container that asks for a GPU."""
    return [
        (deployment, container)
        for deployment, container in manifests.containers()
        if GPU_RESOURCE in container.get("resources", {}).get("limits", {})
        or GPU_RESOURCE in container.get("resources", {}).get("requests", {})
    ]


def test_only_the_gpu_overlay_asks_for_gpus(rendered: dict[str, Manifests]) -> None:
    for overlay, manifests in rendered.items():
        apps = sorted(deployment["metadata"]["name"] for deployment, _ in gpu_pods(manifests))
        assert apps == (["inference"] if overlay == "gpu" else []), f"{overlay}: GPU containers {apps}"
        for deployment in manifests.of_kind("Deployment"):
            spec = pod_spec(deployment)
            on_gpu_nodes = bool(spec.get("tolerations")) or bool(spec.get("nodeSelector"))
            is_gpu = overlay == "gpu" and deployment["metadata"]["name"] == "inference"
            assert on_gpu_nodes == is_gpu, f"{overlay}: {deployment['metadata']['name']} node placement"


def test_gpu_inference_requests_one_gpu_on_gpu_nodes_only(gpu: Manifests) -> None:
    process = gpu.process("services.inference")
    resources = process.container["resources"]
    # Extended resources cannot be overcommitted: a request, if given, equals the limit.
    assert int(resources["limits"][GPU_RESOURCE]) >= 1
    limit = resources["limits"][GPU_RESOURCE]
    assert resources["requests"].get(GPU_RESOURCE, limit) == limit
    spec = process.pod
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {
        "key": GPU_RESOURCE,
        "operator": "Exists",
        "effect": "NoSchedule",
    } in spec["tolerations"], "GPU node pools are tainted nvidia.com/gpu:NoSchedule"


def test_gpu_inference_runs_a_cuda_backend_from_the_cuda_image(gpu: Manifests) -> None:
    process = gpu.process("services.inference")
    settings = load_settings(InferenceSettings, gpu.environment(process.container))
    assert isinstance(settings, InferenceSettings)
    assert settings.device == "cuda", "named, so a pod without a usable GPU fails instead of serving on CPU"
    assert settings.backend in ("onnxruntime", "torch", "tensorrt")
    if settings.backend == "onnxruntime":
        assert settings.variant == "fp32", "the int8 graph's dynamic quantization runs on CPU kernels"
    # The image is the one docker/Dockerfile.gpu's documented build tags, at the version
    # the CPU images are deployed with.
    image = str(process.container["image"])
    repository, tag = image.rsplit(":", 1)
    assert repository.rsplit("/", 1)[-1] == GPU_IMAGE
    assert f"-t {GPU_IMAGE}:{tag}" in GPU_DOCKERFILE.read_text(encoding="utf-8")
    cpu_tags = {str(c["image"]).rsplit(":", 1)[1] for _, c in gpu.containers() if "infermesh" in str(c["image"])}
    assert cpu_tags == {tag}, f"GPU image {tag}, CPU images {cpu_tags}"


def test_the_engine_cache_is_a_shared_volume_at_the_configured_path(gpu: Manifests) -> None:
    process = gpu.process("services.inference")
    settings = load_settings(InferenceSettings, gpu.environment(process.container))
    assert isinstance(settings, InferenceSettings)
    assert settings.engine_cache_dir is not None, "engines would go into the read-only image"
    mounts = {mount["mountPath"]: mount for mount in process.container["volumeMounts"]}
    mount = mounts.get(str(settings.engine_cache_dir))
    assert mount is not None, f"nothing mounted at INFERMESH_INFERENCE_ENGINE_CACHE_DIR={settings.engine_cache_dir}"
    assert not mount.get("readOnly", False)
    (volume,) = [v for v in process.pod["volumes"] if v["name"] == mount["name"]]
    claim = gpu.get("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    # Shared by every replica (they may run on different nodes), so built once per key.
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["labels"].get("app.kubernetes.io/part-of") == "infermesh"
    # The pod's group owns the volume, so UID 10001 can write engines into it.
    assert process.pod["securityContext"]["fsGroup"] == process.pod["securityContext"]["runAsGroup"]
