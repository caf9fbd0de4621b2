"""Interoperability with Hugging Face: checkpoints of every model family in and out.

`lmforge.interop.hf` is the entry point (`load_hf_dir`, `convert_from_hf`, `convert_to_hf`): it asks
the family registry (lmforge/models/registry.py) which family a folder or model directory holds and
hands it to that family's interop module. `lmforge.interop.files` is what they share (config.json and
weight reading, the streaming safetensors writer, sharding, the conversion's output directory, the
tokenizer of a Hugging Face folder).

A family's interop module (decoder.py: GPT-2 / Llama / Mistral / Qwen2 / Qwen3; encoder.py: BERT / RoBERTa /
DistilBERT / ModernBERT and sentence-transformers folders; seq2seq.py: T5 / BART) provides:

    ARCHITECTURES                                   transformers architectures it reads
    recognises(folder, hf_config) -> bool           is this Hugging Face folder one of ours?
    load_hf(folder, hf_config, device, dtype)       -> (model in eval mode, config, Tokenizer or None)
    convert_from_hf(folder, hf_config, out, overwrite) -> out     (an lmforge model directory)
    convert_to_hf(model_dir, config, out, overwrite, max_shard_size) -> out   (a transformers folder)

Nothing is imported here, so `import lmforge.interop` stays cheap.
"""
