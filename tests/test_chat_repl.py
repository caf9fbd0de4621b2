"""`lmforge chat`: the REPL's commands, history, context trimming and Ctrl-C; adding chat tokens."""

from __future__ import annotations

import io
import json

import pytest
import torch

from lmforge.chat import LocalBackend, fit_history, repl
from lmforge.finetune.sft import prepare_chat_model
from lmforge.infer.llm import LLM
from lmforge.models.decoder import Decoder, config_from_preset
from lmforge.tokenizer import CHATML_TEMPLATE, Tokenizer
from sft_fixtures import make_base


class FakeBackend:
    """Replies 'reply N' and records the messages it was sent."""

    has_template = True

    def __init__(self, interrupt_at: int | None = None, limit: int | None = None):
        self.seen, self.interrupt_at, self.limit = [], interrupt_at, limit

    def stream(self, messages, **sampling):
        self.seen.append([dict(m) for m in messages])
        n = len(self.seen)
        for piece in ("reply", " ", str(n)):
            if n == self.interrupt_at and piece == " ":
                raise KeyboardInterrupt
            yield piece

    def count_tokens(self, messages):
        return sum(len(m["content"]) for m in messages)

    def context_length(self):
        return self.limit


def run_repl(backend, lines, **kw):
    out = io.StringIO()
    code = repl(backend, {"max_new_tokens": 4}, stdin=io.StringIO("".join(l + "\n" for l in lines)), out=out, **kw)
    return code, out.getvalue()


def test_history_system_reset_and_save(tmp_path):
    b = FakeBackend()
    save = tmp_path / "conv.jsonl"
    code, text = run_repl(b, ["hello", "again", f"/save {save}", "/reset", "fresh", "/system be kind", "hi", "/exit"],
                          system="sys")
    assert code == 0
    assert b.seen[1] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"},
                         {"role": "assistant", "content": "reply 1"}, {"role": "user", "content": "again"}]
    assert b.seen[2] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "fresh"}]
    assert b.seen[3] == [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    saved = json.loads(save.read_text())
    assert saved["messages"][-1] == {"role": "assistant", "content": "reply 2"} and len(saved["messages"]) == 5
    assert "reply 1\n" in text and "(saved 5 messages" in text


def test_ctrl_c_stops_the_reply_not_the_program():
    b = FakeBackend(interrupt_at=1)
    code, text = run_repl(b, ["first", "second"])
    assert code == 0 and "reply [stopped]" in text and "reply 2" in text
    assert b.seen[1][1] == {"role": "assistant", "content": "reply"}  # the partial reply stays in the history


def test_oldest_turns_are_dropped_when_the_context_is_full():
    b = FakeBackend(limit=40)  # count = characters; max_new_tokens 4
    code, text = run_repl(b, ["a" * 10, "b" * 10, "c" * 10], system="S" * 5)
    assert "dropped the 2 oldest messages" in text
    assert b.seen[2] == [{"role": "system", "content": "SSSSS"}, {"role": "user", "content": "b" * 10},
                         {"role": "assistant", "content": "reply 2"}, {"role": "user", "content": "c" * 10}]
    with pytest.raises(Exception, match="does not fit the model's context of 40 tokens"):
        fit_history(b, [{"role": "user", "content": "x" * 50}], 4)


def test_local_backend_streams_the_models_reply(tmp_path, one_thread):
    base = make_base(tmp_path)
    llm = LLM.load(base)
    prepare_chat_model(llm, "auto")
    expected = llm.chat([{"role": "user", "content": "What is 1 + 1?"}], max_new_tokens=4, temperature=0)
    code, text = repl(LocalBackend(llm), {"max_new_tokens": 4, "temperature": 0},
                      stdin=io.StringIO("What is 1 + 1?\n"), out=(out := io.StringIO())), out.getvalue()
    assert f"> {expected}\n" in text


def test_no_template_falls_back_to_plain_continuation(tmp_path, one_thread):
    llm = LLM.load(make_base(tmp_path))
    assert llm.tokenizer.chat_template is None
    code, text = repl(LocalBackend(llm), {"max_new_tokens": 3, "temperature": 0}, stdin=io.StringIO("abc\n"),
                      out=(out := io.StringIO())), out.getvalue()
    assert "no chat template; what you type is continued as plain text" in text
    assert f"> {llm.generate('abc', max_new_tokens=3, temperature=0)}\n" in text


def test_missing_chat_tokens_are_added_with_mean_embeddings(tmp_path):
    from tokenizers import Tokenizer as HFTok, models

    hf = HFTok(models.WordLevel({"<eos>": 0, "a": 1, "b": 2}, unk_token="<eos>"))
    tok = Tokenizer(hf, eos_token="<eos>", pad_token=None)
    torch.manual_seed(0)
    model = Decoder(config_from_preset("tiny", vocab_size=3, tie_embeddings=False))
    llm = LLM(model, model.cfg, tok)
    notes = prepare_chat_model(llm, "auto")
    assert notes[0].startswith("added the chat tokens <|im_start|>, <|im_end|> to the tokenizer (ids 3..4)")
    assert tok.chat_template == CHATML_TEMPLATE and tok.end_of_turn_id == 4 and tok.stop_ids == {0, 4}
    assert model.tok_emb.weight.shape[0] == 5 and model.lm_head.weight.shape[0] == 5 and model.cfg.vocab_size == 5
    mean = model.tok_emb.weight[:3].mean(0)
    torch.testing.assert_close(model.tok_emb.weight[3], mean)
    torch.testing.assert_close(model.lm_head.weight[4], model.lm_head.weight[:3].mean(0))
    assert model(torch.tensor([[3, 1, 4]])).shape == (1, 3, 5)
