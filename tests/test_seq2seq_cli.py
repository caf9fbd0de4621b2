"""`lmforge convert` and `lmforge generate --num-beams` on a T5 folder, against transformers."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from reference_libs import reference_lib
transformers = reference_lib("transformers")

from lmforge.cli import main  # noqa: E402

from test_seq2seq_llm import _hf_text, t5_folder  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


def test_cli_convert_generate_and_export(tmp_path, capsys):
    model, tok = t5_folder(tmp_path / "hf")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    assert json.loads((tmp_path / "ours" / "model_config.json").read_text())["family"] == "seq2seq"
    capsys.readouterr()
    text = "long live the king"
    assert main(["generate", "--ckpt", str(tmp_path / "ours"), "--prompt", text, "--temperature", "0",
                 "--max-new-tokens", "8", "--num-beams", "3"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == _hf_text(model, tok, text, num_beams=3)[0]
    assert main(["convert", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back, info = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    src = torch.tensor([tok(text)["input_ids"]])
    dec = torch.tensor([[0, 5, 6]])
    with torch.no_grad():
        assert (back.eval()(input_ids=src, decoder_input_ids=dec).logits
                - model(input_ids=src, decoder_input_ids=dec).logits).abs().max() < 1e-4
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back_tok(text)["input_ids"] == tok(text)["input_ids"]
