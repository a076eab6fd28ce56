"""Refresh the schemas in this directory from the PyPI packages that ship them (run by hand, not in tests).

    pip download --no-deps check-jsonschema==0.39.0 kubernetes-validate==1.37.0 -d /tmp/wheels
    python deploy/schemas/vendor.py /tmp/wheels/check_jsonschema-*.whl /tmp/wheels/kubernetes_validate-*.whl

compose-spec.json is copied whole from check-jsonschema's vendored schemas. The Kubernetes schemas are
kubernetes-validate's "local-strict" set for one Kubernetes version: the schema of each kind the
manifests use, and _definitions.json cut to the definitions those kinds reach (the whole file is 1.8 MB).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
KUBERNETES_VERSION = "v1.37.0"
KINDS = (
    "configmap-v1",
    "persistentvolumeclaim-v1",
    "job-batch-v1",
    "service-v1",
    "secret-v1",
)
REF = re.compile(r'"\$ref": "(?:/api/_definitions\.json)?#/\$defs/([^"]+)"')


def _closure(definitions: dict[str, Any], roots: set[str]) -> dict[str, Any]:
    keep: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        todo += REF.findall(json.dumps(definitions[name]))
    return {name: definitions[name] for name in sorted(keep)}


def main(compose_wheel: Path, kubernetes_wheel: Path) -> None:
    with zipfile.ZipFile(compose_wheel) as wheel:
        vendor = "check_jsonschema/builtin_schemas/vendor"
        (HERE / "compose-spec.json").write_bytes(wheel.read(f"{vendor}/compose-spec.json"))
        (HERE / "LICENSE.compose-spec").write_bytes(wheel.read(f"{vendor}/licenses/LICENSE.compose-spec"))
    out = HERE / "kubernetes" / f"{KUBERNETES_VERSION}-strict"
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(kubernetes_wheel) as wheel:
        base = f"kubernetes_validate/kubernetes-json-schema/{KUBERNETES_VERSION}-local-strict"
        roots: set[str] = set()
        for kind in KINDS:
            text = wheel.read(f"{base}/{kind}.json").decode()
            (out / f"{kind}.json").write_text(text, encoding="utf-8")
            roots.update(REF.findall(text))
        definitions = json.loads(wheel.read(f"{base}/_definitions.json"))
        definitions["$defs"] = _closure(definitions["$defs"], roots)
        (out / "_definitions.json").write_text(json.dumps(definitions, indent=1) + "\n", encoding="utf-8")
        license_name = next(n for n in wheel.namelist() if n.endswith("licenses/LICENSE"))
        (HERE / "LICENSE.kubernetes-validate").write_bytes(wheel.read(license_name))
    for wheel_path in (compose_wheel, kubernetes_wheel):
        digest = hashlib.sha256(wheel_path.read_bytes()).hexdigest()
        sys.stdout.write(f"{wheel_path.name} sha256 {digest}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
