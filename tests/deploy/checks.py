"""Checks of the deployment artefacts that no off-the-shelf tool makes: each returns a list of
problems (empty when fine), so a test can assert both that the real file passes and that a broken
copy is caught."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import promql_parser

# --- Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comment lines dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):  # Docker drops comments, even inside a continuation
            continue
        pending += " " + (stripped.removesuffix("\\"))
        if not stripped.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def env_pairs(args: str) -> dict[str, str]:
    """ENV A=1 B="two words" -> {"A": "1", "B": "two words"} (the legacy `ENV A 1` form too)."""
    parts = shlex.split(args)
    if parts and "=" not in parts[0]:
        return {parts[0]: " ".join(parts[1:])}
    return dict(p.split("=", 1) for p in parts)


def _substitute(value: str, variables: dict[str, str]) -> str:
    """Docker's ${NAME} / $NAME expansion (the forms the Dockerfile uses) with `variables`."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), value)


def stage_env(text: str, build_args: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the final stage's image carries: its ENV values with its ARGs expanded
    (`build_args` as `docker build --build-arg` passes them, else each ARG's default)."""
    ins = dockerfile_instructions(text)
    froms = [i for i, (word, _) in enumerate(ins) if word == "FROM"]
    args, env = {}, {}
    for word, rest in ins[froms[-1] if froms else 0 :]:
        if word == "ARG":
            key, _, default = rest.partition("=")
            args[key] = (build_args or {}).get(key, default)
        elif word == "ENV":
            env.update({k: _substitute(v, {**args, **env}) for k, v in env_pairs(rest).items()})
    return env


def _apt_packages(runs: list[str]) -> set[str]:
    """Package names that `apt-get install` lines in these RUN instructions install."""
    names = set()
    for run in runs:
        for part in re.split(r"&&|;|\|\|", run):
            words = part.split()
            if words[:2] == ["apt-get", "install"] or words[:2] == ["apt", "install"]:
                names.update(w.split("=")[0] for w in words[2:] if not w.startswith("-"))
    return names


def _exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def project_installs(text: str, build_args: dict[str, str] | None = None) -> list[str]:
    """What each `pip install` of the project (/src) in the Dockerfile asks pip for, e.g. "/src[openvino]":
    the argument as the build's shell expands it, with the stage's ARGs (`build_args`, else their
    defaults) in its environment, as Docker runs a RUN instruction."""
    found, args = [], {}
    for word, rest in dockerfile_instructions(text):
        if word == "FROM":
            args = {}
        elif word == "ARG":
            key, _, default = rest.partition("=")
            args[key] = (build_args or {}).get(key, shlex.split(default)[0] if default.strip() else "")
        elif word == "RUN":
            for part in re.split(r"&&|;|\|\|", rest):
                words = part.split()
                if words[:2] != ["pip", "install"]:
                    continue
                for target in words[2:]:
                    if target.strip("\"'").startswith("/src"):
                        cmd = ["sh", "-c", "printf '%s' " + target]
                        shell = subprocess.run(cmd, env=args, capture_output=True, text=True, check=False)
                        found.append(shell.stdout if shell.returncode == 0 else f"<sh: {shell.stderr.strip()}>")
    return found


def dockerfile_problems(text: str, torch_pin: str) -> list[str]:
    """The container contract (non-root, health check, signals, ports) that hadolint does not know about."""
    problems = []
    ins = dockerfile_instructions(text)
    froms = [i for i, (word, _) in enumerate(ins) if word == "FROM"]
    if len(froms) < 2:
        problems.append("not multi-stage: expected a build stage and a runtime stage")
    final = ins[froms[-1] :] if froms else ins
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
    if args.get("TORCH_VERSION") != torch_pin:
        problems.append(f"ARG TORCH_VERSION={args.get('TORCH_VERSION')!r} differs from pyproject's torch=={torch_pin}")
    if "TORCH_INDEX_URL" not in args:
        problems.append("no ARG TORCH_INDEX_URL to pick the CUDA (or CPU) wheel index")
    env = stage_env(text)
    if env.get("NVIDIA_VISIBLE_DEVICES") != "all":
        got = env.get("NVIDIA_VISIBLE_DEVICES")
        problems.append(f"the GPU image (default build arguments) must set NVIDIA_VISIBLE_DEVICES=all, got {got!r}")
    if stage_env(text, {"NVIDIA_VISIBLE_DEVICES": "void"}).get("NVIDIA_VISIBLE_DEVICES") != "void":
        problems.append("NVIDIA_VISIBLE_DEVICES must come from a build argument, so the CPU image can say void")
    if project_installs(text) != ["/src"]:
        got = project_installs(text)
        problems.append(f"the GPU image (default build arguments) must install the project without extras, got {got}")
    if project_installs(text, {"EXTRAS": "openvino"}) != ["/src[openvino]"]:
        problems.append("the project's extras must come from the EXTRAS build argument, so the CPU image gets OpenVINO")
    packages = _apt_packages([rest for word, rest in final if word == "RUN"])
    if not packages & {"gcc", "clang", "build-essential"} or not packages & {"g++", "clang", "build-essential"}:
        problems.append("the runtime stage installs no C and C++ compiler: torch.compile (Triton, inductor) needs them")
    if set((env.get("NVIDIA_DRIVER_CAPABILITIES") or "").split(",")) < {"compute", "utility"}:
        problems.append("NVIDIA_DRIVER_CAPABILITIES must include compute,utility")
    if env.get("MPRNET_HOST") != "0.0.0.0":
        problems.append("MPRNET_HOST must be 0.0.0.0 in a container (the service's default is loopback)")
    users = [rest for word, rest in final if word == "USER"]
    if not users or not re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]):
        problems.append(f"the runtime user must be numeric and not root, got USER {users[-1] if users else None!r}")
    cmds = [rest for word, rest in final if word == "CMD"]
    cmd = _exec_form(cmds[-1]) if cmds else None
    if cmd != ["mprnet-serve"]:
        got = cmds[-1] if cmds else None
        problems.append(f'CMD must be the exec form ["mprnet-serve"] so the server is PID 1 and gets SIGTERM, got {got!r}')
    for word, rest in final:
        if word == "ENTRYPOINT":
            form = _exec_form(rest)
            if form is None or form[0] in ("sh", "/bin/sh", "bash", "/bin/bash"):
                problems.append(f"ENTRYPOINT {rest!r} wraps the server in a shell, which does not forward SIGTERM")
    stops = [rest for word, rest in final if word == "STOPSIGNAL"]
    if stops and stops[-1] not in ("SIGTERM", "15"):
        problems.append(f"STOPSIGNAL {stops[-1]} does not start the server's drain (SIGTERM does)")
    checks = [rest for word, rest in final if word == "HEALTHCHECK"]
    probe = None
    if checks:
        m = re.search(r"\bCMD\s+(\[.*\])\s*$", checks[-1])
        probe = _exec_form(m.group(1)) if m else None
    if not probe or "/livez" not in " ".join(probe) or probe[0] in ("curl", "wget"):
        problems.append(
            f"HEALTHCHECK must be exec form, probe /livez with python (no curl in slim), got {checks[-1] if checks else None!r}"
        )
    return problems


# --- .dockerignore -----------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_excluded(rules: str, path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last matching rule wins, a rule
    matches a path or any folder above it, and `!rule` brings a path back."""
    excluded = False
    parents = path.split("/")
    candidates = ["/".join(parents[: i + 1]) for i in range(len(parents))]
    for line in rules.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = _pattern_regex(line.lstrip("!").strip("/").removeprefix("./"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


# --- Kubernetes --------------------------------------------------------------------------------


def autoscaler_problems(docs: list[dict]) -> list[str]:
    """At most one autoscaler (an HPA, or a KEDA ScaledObject, which creates its own HPA) per
    Deployment: two would fight over the replica count."""
    owners: dict[str, list[str]] = {}
    for d in docs:
        if d.get("kind") in ("HorizontalPodAutoscaler", "ScaledObject"):
            ref = d["spec"]["scaleTargetRef"]
            if ref.get("kind", "Deployment") == "Deployment":
                owners.setdefault(ref["name"], []).append(f"{d['kind']}/{d['metadata']['name']}")
    return [f"Deployment {name} has {len(who)} autoscalers: {', '.join(who)}" for name, who in owners.items() if len(who) > 1]


def gpu_limits(docs: list[dict]) -> list[object]:
    """Every container's nvidia.com/gpu limit (None where it has none)."""
    return [
        (c.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu")
        for d in docs
        if d.get("kind") == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    ]


def settings_of(docs: list[dict]) -> dict[str, str]:
    """The MPRNET_* settings from the rendered ConfigMap the Deployment reads."""
    (deploy,) = [d for d in docs if d.get("kind") == "Deployment"]
    names = [
        ref["configMapRef"]["name"]
        for c in deploy["spec"]["template"]["spec"]["containers"]
        for ref in c.get("envFrom", [])
        if "configMapRef" in ref
    ]
    maps = [d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"] in names]
    assert maps, f"the ConfigMap(s) {names} the Deployment reads are not in the rendered output"
    return {k: str(v) for m in maps for k, v in (m.get("data") or {}).items()}


def shutdown_problems(deploy: dict, settings: dict[str, str]) -> list[str]:
    """terminationGracePeriodSeconds must cover preStop + the server's drain; the drain must cover
    the longest an admitted request may wait."""
    pod = deploy["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "mprnet"]
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    sleep = pre_stop.get("sleep", {}).get("seconds", 0)
    grace = float(settings.get("MPRNET_GRACE_PERIOD_S", 30))
    timeout = float(settings.get("MPRNET_REQUEST_TIMEOUT_S", 60))
    total = pod.get("terminationGracePeriodSeconds", 30)
    problems = []
    if not pre_stop:
        problems.append("no preStop hook: SIGTERM would arrive while endpoints still route traffic here")
    if total < sleep + grace + 1:
        problems.append(f"terminationGracePeriodSeconds={total} < preStop {sleep} s + MPRNET_GRACE_PERIOD_S {grace:g} s (+1 s)")
    if grace < timeout:
        problems.append(
            f"MPRNET_GRACE_PERIOD_S={grace:g} < MPRNET_REQUEST_TIMEOUT_S={timeout:g}: admitted requests could be cut off"
        )
    return problems


def pod_problems(deploy: dict, writable: list[str], min_startup_s: float) -> list[str]:
    """Probes on the right endpoints, non-root, read-only root with volumes on every writable path."""
    problems = []
    pod = deploy["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == "mprnet"]
    ports = {p.get("name") for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
    for probe, path in (("startupProbe", None), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        spec = c.get(probe)
        if not spec:
            problems.append(f"no {probe}")
            continue
        get = spec.get("httpGet", {})
        if path and get.get("path") != path:
            problems.append(f"{probe} checks {get.get('path')!r}, not {path}")
        if get.get("port") not in ports:
            problems.append(f"{probe} port {get.get('port')!r} is not a container port")
    startup = c.get("startupProbe") or {}
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    if budget < min_startup_s:
        problems.append(f"startupProbe allows {budget} s, under the {min_startup_s:g} s that model load + warm-up may take")
    sec, psec = c.get("securityContext", {}), pod.get("securityContext", {})
    if not (sec.get("runAsNonRoot") or psec.get("runAsNonRoot")):
        problems.append("runAsNonRoot is not set")
    if 0 in (sec.get("runAsUser"), psec.get("runAsUser")):
        problems.append("runs as uid 0")
    if not sec.get("readOnlyRootFilesystem"):
        problems.append("root filesystem is writable")
    if sec.get("allowPrivilegeEscalation", True):
        problems.append("allowPrivilegeEscalation is not false")
    if pod.get("enableServiceLinks", True):
        problems.append("enableServiceLinks: a Service named mprnet injects MPRNET_PORT=tcp://... into the settings")
    volumes = pod.get("volumes", [])
    scratch = {v["name"] for v in volumes if "emptyDir" in v}
    scratch |= {v["name"] for v in volumes if not v.get("persistentVolumeClaim", {"readOnly": True}).get("readOnly")}
    mounted = {m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in scratch and not m.get("readOnly")}
    for path in writable:
        if not any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounted):
            problems.append(f"{path} is not on an emptyDir or a writable claim: it would be read-only")
    return problems


def _cpus(quantity: object) -> float:
    """A Kubernetes CPU quantity ("4", "500m", 2) in CPUs."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def compile_threads_problems(deploy: dict) -> list[str]:
    """inductor's compile workers are capped by TORCHINDUCTOR_COMPILE_THREADS: a literal no larger
    than the container's CPU request, or the request (or a CPU limit that is set) itself."""
    (c,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "mprnet"]
    resources = c.get("resources", {})
    env = {e["name"]: e for e in c.get("env", [])}
    var = env.get("TORCHINDUCTOR_COMPILE_THREADS")
    if var is None:
        return ["TORCHINDUCTOR_COMPILE_THREADS is not set: inductor would start a compile worker per CPU of the node"]
    ref = (var.get("valueFrom") or {}).get("resourceFieldRef")
    if ref is not None:
        kind, _, name = ref.get("resource", "").partition(".")
        if name != "cpu" or kind not in ("requests", "limits") or (resources.get(kind) or {}).get("cpu") is None:
            return [f"TORCHINDUCTOR_COMPILE_THREADS comes from {ref.get('resource')!r}, which the container does not set"]
        if ref.get("containerName", c["name"]) != c["name"] or _cpus(ref.get("divisor", "1")) != 1:
            return [f"TORCHINDUCTOR_COMPILE_THREADS must read this container's CPUs with divisor 1, got {ref}"]
        return []
    request = (resources.get("requests") or {}).get("cpu")
    value = str(var.get("value", ""))
    if not value.isdigit() or int(value) < 1 or (request is not None and int(value) > max(1, _cpus(request))):
        return [f"TORCHINDUCTOR_COMPILE_THREADS={value!r} is not a worker count within the CPU request {request}"]
    return []


# --- PromQL and metric names -------------------------------------------------------------------

_GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$task": ".*"}


def query_metrics(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (Grafana variables substituted). Raises on a
    syntax error, so a broken query fails the test too."""
    for var, value in _GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    names: set[str] = set()

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable of a Grafana dashboard."""
    out = []

    def panels(items: list[dict]):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard.get("panels", [])):
        for t in p.get("targets", []):
            out.append((f"panel {p.get('title')!r} {t.get('refId')}", t["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"\s*label_values\((.+),\s*\w+\)\s*", q)
            out.append((f"variable {var['name']!r}", m.group(1) if m else q))
    return out


def exported_metrics(exposition: str) -> set[str]:
    """Series names a Prometheus text exposition declares (from its # TYPE lines, so a labelled
    metric counts before its first sample): histogram X gives X_bucket, X_sum, X_count."""
    names = set()
    for line in exposition.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[:2] == ["#", "TYPE"]:
            name, kind = parts[2], parts[3]
            suffixes = {
                "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count"),
                "counter": ("", "_total"),
            }.get(kind, ("",))
            names.update(name + s for s in suffixes)
    return names


def adapter_metricsquery(rule: dict, series: str) -> str:
    """A prometheus-adapter rule's metricsQuery as Prometheus would receive it."""
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", 'namespace="mprnet",pod=~"mprnet-.*"')
        .replace("<<.GroupBy>>", "pod")
    )
