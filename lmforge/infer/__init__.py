"""Inference: KV-cached generation (sampling, stop strings, streaming, batching) and the `LLM` API.

The batch engine is `lmforge.infer.generate.generate` (not re-exported here, so that the name
`lmforge.infer.generate` keeps meaning the module).
"""

from lmforge.infer.generate import Generation, generate_ids, stream_text
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams, sample_next

__all__ = ["LLM", "Generation", "SamplingParams", "generate_ids", "sample_next", "stream_text"]
