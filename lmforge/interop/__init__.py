"""Interoperability with other ecosystems. `lmforge.interop.hf`: Hugging Face transformers checkpoints
(GPT-2, Llama, Mistral, Qwen2) in and out: `load_hf_dir`, `convert_from_hf`, `convert_to_hf`.

Nothing is imported here, so `import lmforge.interop` stays cheap; import `lmforge.interop.hf`.
"""
