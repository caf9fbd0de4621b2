"""What parity tests compare lmforge with: transformers, sentence-transformers, sklearn, real weights.

They come with the dev extra, so a missing one is a broken setup: the test fails and says so rather
than skipping (a skip would hide that the comparison never ran).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def reference_lib(module: str) -> ModuleType:
    """Import `module`, or fail the test that needs it with a message naming the fix."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        error = f"{e.__class__.__name__}: {e}"
    pytest.fail(f"this parity test needs {module}, which cannot be imported ({error}); "
                "install the dev extra: pip install -e '.[dev]'", pytrace=False)
