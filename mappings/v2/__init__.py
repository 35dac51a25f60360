"""HL7 v2 parsing and conversion to FHIR R4 (pure functions).

Runs compiled (mypyc) when a build of exactly these sources exists; see :mod:`mappings.compiled`.
``COMPILED`` says which.
"""

import sys

from mappings import compiled as _compiled

COMPILED = _compiled.usable()
if COMPILED:
    # The submodules are found in the build first; its shared library is a top-level module.
    __path__.insert(0, str(_compiled.BUILD_DIR / "mappings" / "v2"))
    if str(_compiled.BUILD_DIR) not in sys.path:
        sys.path.append(str(_compiled.BUILD_DIR))
