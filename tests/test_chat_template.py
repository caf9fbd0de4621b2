"""Chat templates render and tokenize exactly as transformers' apply_chat_template does."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTok
from tokenizers import models, pre_tokenizers, decoders, trainers

from lmforge.data.chat import render_with_mask
from lmforge.errors import LMForgeError
from lmforge.tokenizer import CHATML_TEMPLATE, Tokenizer

from reference_libs import reference_lib
transformers = reference_lib("transformers")

LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
         "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}"
           "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}")
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one, please?"}, {"role": "assistant", "content": "Green, and red."}],
]


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    hf = HFTok(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    text = ["Hi there! What is 2 + 2? Name a colour. Blue. Another one, please? Green, and red. Be terse. "
            "You are a helpful assistant. user assistant system INST"] * 20
    hf.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    hf.save(str(path))
    return path


@pytest.mark.parametrize("name,template", [("chatml", CHATML_TEMPLATE), ("llama3", LLAMA3), ("qwen2", QWEN2),
                                           ("mistral", MISTRAL)])
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_token_ids_equal_transformers(bpe_file, name, template, gen_prompt):
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(bpe_file), bos_token="<s>", eos_token="</s>")
    ref.chat_template = template
    ours = Tokenizer.from_file(bpe_file, eos_token="</s>", pad_token=None)
    ours.bos_token, ours.chat_template = "<s>", template
    for conv in CONVERSATIONS:
        if name == "mistral" and (conv[0]["role"] == "system"):
            continue
        expected = ref.apply_chat_template(conv, add_generation_prompt=gen_prompt, tokenize=True)
        if isinstance(expected, dict) or hasattr(expected, "input_ids"):  # newer transformers return a BatchEncoding
            expected = expected["input_ids"]
        assert ours.apply_chat_template(conv, add_generation_prompt=gen_prompt) == list(expected)
        assert ours.apply_chat_template(conv, add_generation_prompt=gen_prompt, tokenize=False) == \
            ref.apply_chat_template(conv, add_generation_prompt=gen_prompt, tokenize=False)


def test_template_raise_exception_is_a_user_error(bpe_file):
    ours = Tokenizer.from_file(bpe_file, eos_token="</s>", pad_token=None)
    ours.chat_template = MISTRAL
    with pytest.raises(LMForgeError, match="chat template: Conversation roles must alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_sandbox_blocks_python_internals(bpe_file):
    ours = Tokenizer.from_file(bpe_file)
    ours.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(LMForgeError, match="unsafe|failed to render"):
        ours.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, LLAMA3, QWEN2])
def test_loss_mask_marks_exactly_the_assistant_turns(bpe_file, template):
    tok = Tokenizer.from_file(bpe_file, eos_token="</s>", pad_token=None)
    tok.bos_token, tok.chat_template = "<s>", template
    conv = CONVERSATIONS[2]
    ids, labels = render_with_mask(tok, conv)
    trained = [i for i, l in enumerate(labels) if l != -100]
    assert all(labels[i] == ids[i] for i in trained)
    # the trained tokens are exactly: each reply's tokens followed by the end-of-turn token
    eot = tok.end_of_turn_id
    pieces, run = [], []
    for i in range(len(ids)):
        if labels[i] != -100:
            run.append(ids[i])
        elif run:
            pieces.append(run)
            run = []
    if run:
        pieces.append(run)
    assert [tok.decode(p[:-1]) for p in pieces] == ["Blue.", "Green, and red."]
    assert all(p[-1] == eot for p in pieces)
    # nothing from the user turns or the role headers counts
    header = tok.apply_chat_template(conv[:1], add_generation_prompt=True)
    assert all(l == -100 for l in labels[:len(header)])
    # with loss_on prompt_and_completion every token counts
    assert render_with_mask(tok, conv, "prompt_and_completion")[1] == ids
