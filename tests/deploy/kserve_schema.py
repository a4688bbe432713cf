"""Check a KServe custom resource offline against KServe's own API types.

No npm or PyPI package ships the InferenceService CRD's schema, so this reads the types from KServe's
Python SDK (`kserve` on PyPI), whose models are generated from the same Go API types as the CRD, with
the Kubernetes client's models for the pod fields inside. Like the API server with strict validation,
it refuses unknown fields, values of the wrong type and missing required fields (the models' own
constructors check those), and names the path of each.
"""

from __future__ import annotations

import re
from typing import Any

# Types the SDK names but does not model; what their JSON may be.
_OPAQUE = {
    "ResourceQuantity": (str, int, float),  # "4", 8Gi, 0.5
    "V1beta1MetricQuantity": (str, int, float),
    "V1Time": (str,),
    "datetime": (str,),
}
_SCALARS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _model(name: str) -> type | None:
    import kserve.models
    import kubernetes.client.models

    return getattr(kserve.models, name, None) or getattr(kubernetes.client.models, name, None)


def problems(doc: Any, type_name: str = "V1beta1InferenceService") -> list[str]:
    """Every problem of `doc` as a `type_name` (a kserve SDK model name), with its path; [] when valid."""
    found: list[str] = []
    _check(doc, type_name, "", found)
    return found


def _check(value: Any, type_name: str, path: str, found: list[str]) -> Any:
    """Check `value` and return it as the SDK would hold it (a model object, or the plain value)."""
    where = path or "(top)"
    if m := re.fullmatch(r"(?:list|List)\[(.+)\]", type_name):
        if not isinstance(value, list):
            found.append(f"{where}: expected a list, got {type(value).__name__}")
            return None
        return [_check(v, m.group(1), f"{path}[{i}]", found) for i, v in enumerate(value)]
    if m := re.fullmatch(r"(?:dict\(str, |Dict\[str, )(.+)[)\]]", type_name):
        if not isinstance(value, dict):
            found.append(f"{where}: expected a map, got {type(value).__name__}")
            return None
        return {k: _check(v, m.group(1), f"{path}.{k}", found) for k, v in value.items()}
    if type_name == "object":
        return value
    if type_name in _SCALARS or type_name in _OPAQUE:
        allowed = _SCALARS.get(type_name) or _OPAQUE[type_name]
        if not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool)):
            found.append(f"{where}: expected {type_name}, got {type(value).__name__} {value!r}")
        return value
    cls = _model(type_name)
    if cls is None:
        return value  # a type the SDK names without a model (status fields): nothing to check against
    if not isinstance(value, dict):
        found.append(f"{where}: expected an object ({type_name}), got {type(value).__name__}")
        return None
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    before = len(found)
    kwargs = {}
    for key, item in value.items():
        attr = by_json.get(key)
        if attr is None:
            found.append(f"{path}.{key}: unknown field of {type_name}".lstrip("."))
            continue
        kwargs[attr] = _check(item, cls.openapi_types[attr], f"{path}.{key}".lstrip("."), found)
    if len(found) > before:
        return None  # already wrong inside: the model would only repeat it
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # the model's own checks: required fields, allowed values
        found.append(f"{where}: {type_name}: {_short(e)}")
        return None


def _short(e: Exception) -> str:
    """One line: pydantic's multi-line message (the Kubernetes client's newer models) without its links."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and "errors.pydantic.dev" not in line]
    return "; ".join(lines)
