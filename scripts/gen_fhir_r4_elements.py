"""Generate gateway/fhir_r4_elements.json: every element FHIR R4 (4.0.1) defines, per type.

Usage: python scripts/gen_fhir_r4_elements.py [VALIDATOR_HOME]

The source is the R4 StructureDefinitions HAPI FHIR ships in ``hapi-fhir-validation-resources-r4``
(``profiles-types.xml`` and ``profiles-resources.xml``, the files of the FHIR 4.0.1 release),
taken from the reference validator's build (``scripts/install-validator.sh`` prints its
directory; default: run that script). The gateway validates input with the R4B models of
``fhir.resources``; it then walks the JSON with this table and rejects every resource type and
element that R4 does not have (``gateway/fhir.py``), so that what it stores is R4.

Output: ``{"resources": [...], "contexts": {context: {json key: child}}}``. A context is a
type name (``Observation``, ``CodeableConcept``) or the path of a backbone element
(``Observation.component``). ``child`` is ``""`` for a primitive, ``"*"`` for a resource
(``contained``, ``Bundle.entry.resource``), else the context of the value. Choice elements are
expanded (``value[x]`` -> ``valueQuantity``, ``valueString`` ...).
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "gateway" / "fhir_r4_elements.json"
NS = {"f": "http://hl7.org/fhir"}
PROFILES = "org/hl7/fhir/r4/model/profile/"
#: Types whose elements are a JSON object (not primitives, not resources).
BACKBONE = {"BackboneElement", "Element"}


def _value(node: ET.Element, name: str) -> str | None:
    child = node.find(f"f:{name}", NS)
    return None if child is None else child.get("value")


def _upper_first(code: str) -> str:
    return code[0].upper() + code[1:]


def build(jar: Path) -> dict[str, object]:
    """The element table from the R4 definitions in ``jar``."""
    sds = []
    with zipfile.ZipFile(jar) as z:
        for name in ("profiles-types.xml", "profiles-resources.xml"):
            root = ET.fromstring(z.read(PROFILES + name))
            sds += root.findall("f:entry/f:resource/f:StructureDefinition", NS)
    primitives = set()
    resources = []
    for sd in sds:
        if _value(sd, "kind") == "primitive-type":
            primitives.add(_value(sd, "type"))
    contexts: dict[str, dict[str, str]] = {}
    for sd in sds:
        kind, name = _value(sd, "kind"), _value(sd, "name")
        if kind == "primitive-type" or _value(sd, "derivation") == "constraint":
            continue  # primitives have no JSON object; profiles add no element
        if kind == "resource" and _value(sd, "abstract") != "true":
            resources.append(name)  # not Resource, DomainResource: no instance has them
        for el in sd.findall("f:snapshot/f:element", NS):
            path = _value(el, "path") or ""
            if "." not in path:
                contexts.setdefault(path, {})
                continue
            parent, key = path.rsplit(".", 1)
            table = contexts.setdefault(parent, {})
            ref = _value(el, "contentReference")
            codes = [t.get("value") or "" for t in el.findall("f:type/f:code", NS)]
            if ref:
                table[key] = ref.lstrip("#")
                continue
            if key.endswith("[x]"):
                stem = key[:-3]
                for code in codes:
                    table[stem + _upper_first(code)] = "" if code in primitives else code
                continue
            code = codes[0] if codes else ""
            if code.startswith("http://hl7.org/fhirpath/") or code in primitives:
                table[key] = ""
            elif code == "Resource":
                table[key] = "*"
            elif code in BACKBONE and name not in ("Element", "BackboneElement"):
                table[key] = path  # an inline element: its children are under its path
            else:
                table[key] = code
    return {
        "source": f"{jar.name}: {PROFILES}profiles-types.xml, profiles-resources.xml (FHIR 4.0.1)",
        "resources": sorted(r for r in resources if r),
        "contexts": {k: dict(sorted(v.items())) for k, v in sorted(contexts.items())},
    }


def _validator_home(argv: list[str]) -> Path:
    if argv:
        return Path(argv[0])
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install-validator.sh")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    """Write the table; print what changed."""
    home = _validator_home(argv)
    (jar,) = sorted((home / "lib").glob("hapi-fhir-validation-resources-r4-*.jar"))
    text = json.dumps(build(jar), separators=(",", ":"), sort_keys=False) + "\n"
    old = OUT.read_text("utf-8") if OUT.exists() else None
    if old != text:
        OUT.write_text(text, "utf-8")
        print(f"{'updated' if old else 'created'} {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
