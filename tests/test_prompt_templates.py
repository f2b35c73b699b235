"""data.domain is free text and data.prompt holds the wording: the domain's words and whole templates
(Python format strings), validated when the config loads, with the bad placeholder named."""

from __future__ import annotations

import pytest

from configs.loader import ConfigError, load_config
from retrieval.prompts import DOMAINS, PromptError, ctr_prompt, next_item_prompt, style_for


def test_default_wording_is_unchanged():
    assert style_for("movie") == DOMAINS["movie"]
    assert style_for("movie", load_config("tiny").data.prompt.model_dump()) == DOMAINS["movie"]


def test_free_text_domain_with_its_words():
    style = style_for("product", {"items": "products", "verb_past": "bought", "verb": "buy"})
    text = ctr_prompt(["Mug", "Kettle"], [5, 3], "Teapot", style)
    assert "The user bought the following products in the past" in text and "like the product ***Teapot***" in text
    neutral = style_for("podcast episode")
    assert "interacted with the following podcast episodes" in ctr_prompt(["A"], [None], "B", neutral)


def test_templates_render_every_placeholder():
    style = style_for(
        "product",
        {
            "ctr_template": "{profile}|{subject}|{pronoun}|{history}|{target}|{item}|{items}|{verb_past}|{verb}|"
            "{rating_unit}",
            "next_item_template": "{history}|{candidates}|{n_candidates}|{item}|{items}|{verb_past}|{verb}",
        },
    )
    user = {"gender": "F", "age": 30}
    assert ctr_prompt(["Mug"], [4], "Tea", style, user) == (
        "The user is a female. Her age is 30.|She|she|['0. Mug (4 stars)']|Tea|product|products|interacted with|"
        "interact with|stars"
    )
    assert next_item_prompt(["A", "B"], ["C", "D", "E"], style) == (
        "A, B|C, D, E|3|product|products|interacted with|interact with"
    )


@pytest.mark.parametrize(
    "key,template,named",
    [
        ("ctr_template", "Liked {history}. Answer yes or no.", "missing placeholder {target}"),
        ("ctr_template", "{history} {target} {titel}", "unknown placeholder {titel}"),
        ("next_item_template", "{history} pick one", "missing placeholder {candidates}"),
        ("next_item_template", "{history} {candidates} {", "not a valid format string"),
    ],
)
def test_bad_templates_fail_at_load_naming_key_and_placeholder(key, template, named):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [f"data.prompt.{key}={template}"])
    assert key in str(e.value) and named in str(e.value)
    with pytest.raises(PromptError, match=f"data.prompt.{key}"):
        style_for("movie", {key: template})


def test_empty_domain_is_refused():
    with pytest.raises(ConfigError, match="domain"):
        load_config("tiny", ["data.domain="])
