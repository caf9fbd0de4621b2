"""Tools: schemas from Python functions (as transformers' get_json_schema), tool-aware chat
templates rendering exactly as transformers renders them, the schema of forced calls, and the
tool-call parser on whole, malformed and streamed replies."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from enum import Enum
from typing import Literal, Optional, Union

import pytest
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.data.chat import render_with_mask
from lmforge.errors import LMForgeError
from lmforge.tokenizer import CHATML_TEMPLATE, Tokenizer
from lmforge.tool_parser import ToolCallStream, parse_forced_calls, parse_tool_calls, template_family
from lmforge.tools import argument_error, function_schema, tool_call_schema

from reference_libs import reference_lib
from tool_templates import LLAMA31, QWEN25

transformers = reference_lib("transformers")
get_json_schema = reference_lib("transformers.utils").get_json_schema


class Unit(Enum):
    C = "celsius"
    F = "fahrenheit"


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: The expression, e.g. "47 + 385".
    """
    return expression


def count(word: str, words: list[str]) -> int:
    """How many times a word occurs in a list.

    Args:
        word: The word to count.
        words: The list to count it in.

    Returns:
        The number of times.
    """
    return words.count(word)


def weather(city: str, unit: Unit = Unit.C, days: Optional[int] = None, mode: Literal["now", "daily"] = "now",
            tags: dict[str, float] | None = None, span: tuple[int, str] = (1, "d"), x: Union[int, str] = 0):
    """Get the weather
    in a city.

    Args:
        city: The city, e.g. Paris
              (a name, not a code).
        unit: The unit.
        days (int): How many days.
        mode: What to report (choices: ["now", "daily"])
        tags: Extra weights.
        span: The span.
        x: Anything.
    """


class Shop:
    def price(self, item: str) -> float:
        """The price of an item.

        Args:
            item: The item.
        """
        return 1.0


@pytest.mark.parametrize("func", [calculator, count, weather, Shop().price])
def test_function_schema_equals_transformers(func):
    assert function_schema(func) == get_json_schema(func)


@pytest.mark.parametrize("func,message", [
    (lambda x: x, "needs a docstring"),
    (calculator.__wrapped__ if hasattr(calculator, "__wrapped__") else None, None),
])
def test_function_schema_errors(func, message):
    if func is None:
        return
    with pytest.raises(LMForgeError, match=message):
        function_schema(func)


def test_function_schema_missing_hint_and_doc():
    def f(a, b: int):
        """F.

        Args:
            a: A.
            b: B.
        """
    def g(a: int):
        """G."""
    with pytest.raises(LMForgeError, match="tool f: argument a has no type hint"):
        function_schema(f)
    with pytest.raises(LMForgeError, match="tool g: the docstring's Args: block does not describe the argument 'a'"):
        function_schema(g)


SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]


@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    hf = HFTok(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    text = ['<tool_call>\n{"name": "calculator", "arguments": {"expression": "47 + 385"}}\n</tool_call> user '
            'assistant system tool What is 47 + 385? Answer: 432 count words apple fig'] * 20
    hf.train_from_iterator(text, trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    hf.save(str(path))
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|begin_of_text|>",
                                               eos_token="</s>")
    ours = Tokenizer.from_file(path, eos_token="</s>", pad_token=None)
    ours.bos_token = "<|begin_of_text|>"
    return ours, ref


CALL = {"id": "call_abc", "type": "function",
        "function": {"name": "calculator", "arguments": {"expression": "47 + 385"}}}
TOOL_CONVERSATIONS = [
    [{"role": "user", "content": "What is 47 + 385?"}],
    [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "What is 47 + 385?"}],
    [{"role": "user", "content": "What is 47 + 385?"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
     {"role": "tool", "tool_call_id": "call_abc", "content": "432"},
     {"role": "assistant", "content": "Answer: 432"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count fig in apple, fig"},
     {"role": "assistant", "content": "Let me count.", "tool_calls": [
         {"type": "function", "function": {"name": "count", "arguments": {"word": "fig", "words": ["apple", "fig"]}}}]},
     {"role": "tool", "content": "1"}, {"role": "user", "content": "And apple?"}],
]
PARALLEL = [{"role": "user", "content": "Two sums"},
            {"role": "assistant", "tool_calls": [CALL, {**CALL, "id": "call_def"}]},
            {"role": "tool", "tool_call_id": "call_abc", "content": "432"},
            {"role": "tool", "tool_call_id": "call_def", "content": "432"}]


@pytest.mark.parametrize("name,template", [("chatml", CHATML_TEMPLATE), ("qwen2.5", QWEN25), ("llama3.1", LLAMA31)])
@pytest.mark.parametrize("as_functions", [False, True])
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_tool_rendering_equals_transformers(tokenizers_pair, name, template, as_functions, gen_prompt):
    ours, ref = tokenizers_pair
    ours.chat_template = ref.chat_template = template
    tools = [calculator, count] if as_functions else [get_json_schema(calculator), get_json_schema(count)]
    convs = TOOL_CONVERSATIONS + ([] if name == "llama3.1" else [PARALLEL])
    for conv in convs:
        for t in (tools, None):
            expected = ref.apply_chat_template(conv, tools=t, add_generation_prompt=gen_prompt, tokenize=False)
            assert ours.apply_chat_template(conv, tools=t, add_generation_prompt=gen_prompt, tokenize=False) == expected
            ids = ref.apply_chat_template(conv, tools=t, add_generation_prompt=gen_prompt, tokenize=True)
            ids = ids["input_ids"] if not isinstance(ids, list) else ids
            assert ours.apply_chat_template(conv, tools=t, add_generation_prompt=gen_prompt) == list(ids)


OLD_CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_chatml_without_tools_renders_as_before(tokenizers_pair):
    ours, _ = tokenizers_pair
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    for gen in (True, False):
        assert ours.render_chat(conv, gen, template=CHATML_TEMPLATE) == ours.render_chat(conv, gen, template=OLD_CHATML)
    with pytest.raises(LMForgeError, match="unknown role robot"):
        ours.render_chat([{"role": "robot", "content": "x"}], template=CHATML_TEMPLATE)


def test_chatml_tool_rendering_text(tokenizers_pair):
    ours, _ = tokenizers_pair
    text = ours.render_chat(TOOL_CONVERSATIONS[2], tools=[calculator], template=CHATML_TEMPLATE)
    schema = json.dumps(get_json_schema(calculator))
    assert text == (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + schema +
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWhat is 47 + 385?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"47 + 385\"}}"
        "\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n432\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nAnswer: 432<|im_end|>\n")
    # OpenAI's string arguments render as the object they encode
    conv = [dict(m) for m in TOOL_CONVERSATIONS[2]]
    conv[1] = {**conv[1], "tool_calls": [{**CALL, "function": {"name": "calculator",
                                                               "arguments": '{"expression": "47 + 385"}'}}]}
    assert ours.render_chat(conv, tools=[calculator], template=CHATML_TEMPLATE) == text


def test_loss_mask_covers_tool_calls_not_tool_results(tokenizers_pair):
    ours, _ = tokenizers_pair
    ours.chat_template = CHATML_TEMPLATE
    conv = TOOL_CONVERSATIONS[2]
    ids, labels = render_with_mask(ours, conv, tools=[get_json_schema(calculator)])
    trained = ours.decode([i for i, l in zip(ids, labels) if l != -100])
    assert trained == ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "47 + 385"}}\n</tool_call>'
                       "<|im_end|>Answer: 432<|im_end|>")


def test_template_family():
    assert template_family(CHATML_TEMPLATE) == "hermes"
    assert template_family(QWEN25) == "hermes"
    assert template_family(LLAMA31) == "llama3"
    assert template_family(OLD_CHATML) is None
    assert template_family(None) is None


# ---- forced calls ------------------------------------------------------------------------------

TOOLS = [get_json_schema(calculator), get_json_schema(count)]


def test_tool_call_schema_required_and_named():
    calc_params = TOOLS[0]["function"]["parameters"]
    count_params = TOOLS[1]["function"]["parameters"]
    assert tool_call_schema(TOOLS, "required") == {
        "type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
            {"properties": {"name": {"type": "string", "enum": ["calculator"]}, "parameters": calc_params},
             "required": ["name", "parameters"]},
            {"properties": {"name": {"type": "string", "enum": ["count"]}, "parameters": count_params},
             "required": ["name", "parameters"]}]}}
    assert tool_call_schema(TOOLS, "required", parallel_tool_calls=False)["maxItems"] == 1
    assert tool_call_schema(TOOLS, {"type": "function", "function": {"name": "count"}}) == count_params
    no_params = [{"type": "function", "function": {"name": "now"}}]
    assert tool_call_schema(no_params, {"type": "function", "function": {"name": "now"}}) == \
        {"type": "object", "properties": {}}
    with pytest.raises(LMForgeError, match="tool_choice names the function 'sum', which is not among the tools"):
        tool_call_schema(TOOLS, {"type": "function", "function": {"name": "sum"}})
    with pytest.raises(LMForgeError, match="does not force a call"):
        tool_call_schema(TOOLS, "auto")


def test_argument_error():
    assert argument_error(TOOLS, "count", {"word": "fig", "words": ["fig"]}) is None
    assert argument_error(TOOLS, "sum", {}) == "unknown tool 'sum'"
    assert argument_error(TOOLS, "count", {"word": "fig"}) == "count misses the argument 'words'"
    assert argument_error(TOOLS, "count", {"word": 3, "words": []}) == "count's argument 'word' should be string, got 3"
    assert argument_error(TOOLS, "count", {"word": "a", "words": [], "x": 1}) == "count has no argument 'x'"
    assert argument_error(TOOLS, "calculator", []) == "the arguments of calculator are not a JSON object"


# ---- parsing -----------------------------------------------------------------------------------

ID = re.compile(r"^call_[A-Za-z0-9]{24}$")


def calls_of(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("text,content,calls", [
    ("Answer: 432", "Answer: 432", []),
    ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "1 + 2"}}\n</tool_call>', "",
     [("calculator", {"expression": "1 + 2"})]),
    ('Let me check.\n<tool_call>\n{"name": "count", "arguments": {"word": "a", "words": ["a"]}}\n</tool_call>\n'
     '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"2\\"}"}</tool_call>', "Let me check.",
     [("count", {"word": "a", "words": ["a"]}), ("calculator", {"expression": "2"})]),
    # no closing tag (generation stopped at the end of turn): still a call
    ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "3"}}\n', "", [("calculator", {"expression": "3"})]),
    # malformed: broken JSON, no name, arguments not an object -> text
    ('<tool_call>\n{"name": "calculator", "arguments": {"expression": }\n</tool_call>',
     '<tool_call>\n{"name": "calculator", "arguments": {"expression": }\n</tool_call>', []),
    ('<tool_call>{"arguments": {}}</tool_call> ok', '<tool_call>{"arguments": {}}</tool_call> ok', []),
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', []),
    ('bad <tool_call>{"name"</tool_call> good <tool_call>{"name": "f", "arguments": {}}</tool_call>',
     'bad <tool_call>{"name"</tool_call> good', [("f", {})]),
])
def test_parse_hermes(text, content, calls):
    got_content, got = parse_tool_calls(text, "hermes")
    assert got_content == content
    assert calls_of(got) == calls
    assert all(ID.match(c.id) for c in got) and len({c.id for c in got}) == len(got)


@pytest.mark.parametrize("text,content,calls", [
    ('{"name": "calculator", "parameters": {"expression": "1 + 2"}}', "", [("calculator", {"expression": "1 + 2"})]),
    ('<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "arguments": {"a": 1}}', "",
     [("f", {}), ("g", {"a": 1})]),
    ("The answer is 3.", "The answer is 3.", []),
    ('{"name": "calculator", "parameters": {', '{"name": "calculator", "parameters": {', []),
    ('{"value": 3}', '{"value": 3}', []),
])
def test_parse_llama3(text, content, calls):
    got_content, got = parse_tool_calls(text, "llama3")
    assert (got_content, calls_of(got)) == (content, calls)


def stream_pieces(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        pieces.append(text[i:i + n])
        i += n
    return pieces


STREAM_CASES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "count", "arguments": {"word": "a", "words": ["a"]}}\n'
               '</tool_call>\n<tool_call>{"name": "calculator", "arguments": {"expression": "2"}}</tool_call>'),
    ("hermes", "No tools here: a < b and <tool> is not a call."),
    ("hermes", 'x <tool_call>{"name": broken}</tool_call> y'),
    ("hermes", '<tool_call>\n{"name": "calculator", "arguments": {"expression": "3"}}\n'),
    ("llama3", '{"name": "calculator", "parameters": {"expression": "1 + 2"}}'),
    ("llama3", "  The answer is 3."),
    ("llama3", '{"name": "calculator", "parameters": '),
]


@pytest.mark.parametrize("family,text", STREAM_CASES)
@pytest.mark.parametrize("seed", range(5))
def test_stream_equals_whole(family, text, seed):
    stream = ToolCallStream(family)
    events = []
    for piece in stream_pieces(text, seed):
        events += stream.feed(piece)
    events += stream.finish()
    content = "".join(e[1] for e in events if e[0] == "content")
    calls = [e[1] for e in events if e[0] == "call"]
    whole_content, whole_calls = parse_tool_calls(text, family)
    assert calls_of(calls) == calls_of(whole_calls)
    assert content.strip() == whole_content.strip()


def test_stream_holds_back_only_what_may_be_a_call():
    stream = ToolCallStream("hermes")
    assert stream.feed("Hello <tool") == [("content", "Hello ")]
    assert stream.feed("box") == [("content", "<toolbox")]
    assert stream.feed(' <tool_call>{"name": "f", ') == [("content", " ")]
    assert stream.feed('"arguments": {}}</tool_call>') == [("call", stream_last_call(stream))]


def stream_last_call(stream):
    class Any_:
        def __eq__(self, other):
            return other.name == "f" and other.arguments == "{}"
    return Any_()


def test_tool_template_round_trips_through_convert_to_hf(tmp_path):
    """A ChatML model exported with convert --to-hf: transformers renders tools, tool calls and tool
    results from the exported tokenizer_config exactly as lmforge renders them (text and ids)."""
    import torch

    from lmforge.checkpoint import write_model_dir
    from lmforge.interop.hf import convert_to_hf
    from lmforge.models.decoder import Decoder, config_from_preset

    tok = Tokenizer.train_bpe(["What is 47 + 385? <tool_call> calculator expression Answer: 432 " * 20], vocab_size=300)
    tok.chat_template = CHATML_TEMPLATE
    tok.save(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    model = Decoder(config_from_preset("tiny", vocab_size=tok.vocab_size, block_size=64))
    config = json.dumps(tok.tokenizer_config(64)).encode()
    write_model_dir(tmp_path / "lm", model, tmp_path / "tokenizer.json", extra_files={"tokenizer_config.json": config})
    hf_dir = convert_to_hf(str(tmp_path / "lm"), str(tmp_path / "hf"))
    ref = transformers.AutoTokenizer.from_pretrained(hf_dir)
    back = Tokenizer.load(Path(hf_dir) / "tokenizer.json")
    assert back.chat_template == CHATML_TEMPLATE
    for conv in TOOL_CONVERSATIONS + [PARALLEL]:
        for gen in (True, False):
            expected = ref.apply_chat_template(conv, tools=[calculator, count], add_generation_prompt=gen, tokenize=False)
            assert back.apply_chat_template(conv, tools=[calculator, count], add_generation_prompt=gen,
                                            tokenize=False) == expected
            ids = ref.apply_chat_template(conv, tools=[calculator, count], add_generation_prompt=gen)
            ids = ids["input_ids"] if not isinstance(ids, list) else ids
            assert back.apply_chat_template(conv, tools=[calculator, count], add_generation_prompt=gen) == list(ids)


def test_parse_forced_calls():
    named = {"type": "function", "function": {"name": "count"}}
    assert calls_of(parse_forced_calls('{"word": "fig", "words": ["fig"]}', named)) == [
        ("count", {"word": "fig", "words": ["fig"]})]
    text = '[{"name": "calculator", "parameters": {"expression": "1 + 2"}}, {"name": "sort", "parameters": {"words": []}}]'
    assert calls_of(parse_forced_calls(text, "required")) == [("calculator", {"expression": "1 + 2"}),
                                                              ("sort", {"words": []})]
    assert parse_forced_calls('[{"name": "calc', "required") == []
    assert parse_forced_calls("[1, 2]", named) == []
