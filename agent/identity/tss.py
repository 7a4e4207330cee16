"""The one door to tpm2-pytss: every agent module imports the TSS through here.

tpm2-pytss 1.2 (Debian 12) decides once, at import, to build every TPM
structure as an empty shell when ``unittest.mock`` is already loaded (a
shortcut for its own documentation build), and it builds default arguments
such as ``create_primary``'s ``outside_info`` at that moment. Any library
that happens to import ``unittest.mock`` first would then break the key
store, so the import below does not let it see that module. 3.0 keys the
shortcut on sphinx instead and is unaffected.

The TSS libraries write their own warnings to stderr (``WARNING:tcti:...``
with C file and line) for every failure the agent already reports in one
sentence, such as an absent TPM during the ``auto`` probe or a refused key
load. They are silenced unless ``TSS2_LOG`` is set, so that a technician can
still ask for them (``TSS2_LOG=all+debug``).
"""

from __future__ import annotations

import os
import sys

#: TSS2_LOG value that turns every TSS log module off.
TSS_LOG_SILENT = "all+NONE"
os.environ.setdefault("TSS2_LOG", TSS_LOG_SILENT)

_hidden = sys.modules.pop("unittest.mock", None) if "tpm2_pytss" not in sys.modules else None
try:
    import tpm2_pytss  # noqa: F401
    from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
    from tpm2_pytss.constants import (
        ESYS_TR,
        TPM2_ALG,
        TPM2_CAP,
        TPM2_ECC,
        TPM2_HC,
        TPM2_RC,
        TPM2_RH,
        TPM2_ST,
        TPMA_OBJECT,
        TSS2_RC,
    )
    from tpm2_pytss.types import (
        TPM2B_DIGEST,
        TPM2B_PRIVATE,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPMT_PUBLIC,
        TPMT_SIG_SCHEME,
        TPMT_SIGNATURE,
        TPMT_TK_HASHCHECK,
    )
finally:
    if _hidden is not None:
        sys.modules["unittest.mock"] = _hidden

__all__ = [
    "ESAPI", "ESYS_TR", "TCTILdr", "TPM2B_DIGEST", "TPM2B_PRIVATE", "TPM2B_PUBLIC",
    "TPM2B_SENSITIVE_CREATE", "TPM2_ALG", "TPM2_CAP", "TPM2_ECC", "TPM2_HC", "TPM2_RC", "TPM2_RH",
    "TPM2_ST", "TPMA_OBJECT", "TPMT_PUBLIC", "TPMT_SIG_SCHEME", "TPMT_SIGNATURE",
    "TPMT_TK_HASHCHECK", "TSS2_Exception", "TSS2_RC",
]
