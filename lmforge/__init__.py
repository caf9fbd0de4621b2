"""lmforge: build, train, fine-tune, evaluate and serve transformer language models."""

__version__ = "0.1.0"

from lmforge.errors import LMForgeError  # noqa: E402


def __getattr__(name):
    # `from lmforge import LLM` without importing torch at package import time.
    if name == "LLM":
        from lmforge.infer.llm import LLM

        return LLM
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")


__all__ = ["LLM", "LMForgeError", "__version__"]
