"""Import every module a bench/gpu.sh run needs: the service and model packages (the serving path;
model.training is not part of it) and the benchmark drivers. Finding a module (importlib's
find_spec) is not enough: it can be found and still fail to import, when one of its own imports is
missing or too old (fastapi without opentelemetry-api, pydantic with an old typing-extensions).

    python -m bench.importcheck     # one line per module that fails; exit status 1 if any does
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import traceback

PACKAGES = ("model", "service")
LEFT_OUT = ("model.training",)  # training and evaluation: not imported by the serving path
# (and each package's __main__, which runs its command when imported: its imports are modules listed here)
BENCH = ("bench.engine", "bench.gpu_report", "bench.load", "bench.reference")


def modules() -> list[str]:
    """Every module of PACKAGES (less LEFT_OUT and __main__), then BENCH."""
    names = []
    for package in PACKAGES:
        root = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}.", onerror=lambda name: None):
            if not info.name.startswith(LEFT_OUT) and not info.name.endswith(".__main__"):
                names.append(info.name)
    return names + list(BENCH)


def failures(names: list[str]) -> dict[str, str]:
    """{module: the error its import raised} for each module that does not import."""
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any import error is a finding, reported by name
            last = traceback.extract_tb(err.__traceback__)[-1]
            failed[name] = f"{type(err).__name__}: {err} (at {last.filename}:{last.lineno})"
    return failed


def main() -> int:
    try:
        names = modules()
    except Exception as err:  # noqa: BLE001 - a package that cannot even be listed is a failure too
        print(f"import check: cannot list the modules: {type(err).__name__}: {err}")
        return 1
    failed = failures(names)
    for name, error in failed.items():
        print(f"import check: {name} does not import: {error}")
    print(f"import check: {len(names) - len(failed)} of {len(names)} modules import")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
