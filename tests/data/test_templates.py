import pytest
from transformers import PreTrainedTokenizerFast

from dgpo.data import DEFAULT_TEMPLATE, format_prompt


def test_format_prompt_default_template_asks_for_boxed() -> None:
    text = format_prompt("What is 1 + 1?", None, use_chat_template=False)
    assert (
        text
        == "What is 1 + 1?\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert text == DEFAULT_TEMPLATE.format(problem="What is 1 + 1?")


def test_format_prompt_custom_template_keeps_problem_braces() -> None:
    text = format_prompt("Find $x^{2}$.", None, "Q: {problem} Answer in \\boxed{{}}.", False)
    assert text == "Q: Find $x^{2}$. Answer in \\boxed{}."


def test_format_prompt_system_prompt_without_chat_template() -> None:
    text = format_prompt(
        "2 + 2?", None, "{problem}", use_chat_template=False, system_prompt="Be brief."
    )
    assert text == "Be brief.\n\n2 + 2?"


def test_format_prompt_chat_template(tokenizer: PreTrainedTokenizerFast) -> None:
    text = format_prompt("What is 1 + 1?", tokenizer, "{problem}", system_prompt="Be brief.")
    expected = "<s><|system|>\nBe brief.\n<|user|>\nWhat is 1 + 1?\n<|assistant|>\n"
    assert text == expected
    no_system = format_prompt("What is 1 + 1?", tokenizer, "{problem}")
    assert no_system == "<s><|user|>\nWhat is 1 + 1?\n<|assistant|>\n"


def test_format_prompt_chat_template_missing(plain_tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="has no chat template; set use_chat_template=False"):
        format_prompt("x", plain_tokenizer)
    with pytest.raises(ValueError, match="needs a tokenizer, got None"):
        format_prompt("x", None)


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("Solve this.", "must contain the field {problem}"),
        ("{problem} in \\boxed{}", r"replacement fields \[''\].*\\boxed\{\{\}\}"),
        ("{question}", r"replacement fields \['question'\]"),
        ("{problem", "not a valid str.format string"),
    ],
)
def test_format_prompt_bad_template(template: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        format_prompt("x", None, template, use_chat_template=False)
