"""Prompt templates, in one place, shared by the sample builder, the trainer and the predictors.

CTR follows ReLLa/RecLoRA (papers.md 1.2): an optional profile sentence, the rated history as a Python
list literal of "i. Title (r stars)" strings, the target in ***Title***, and the yes/no instruction.
Next item follows LLaRA/iLoRA (papers.md 2.1) with optional per-item placeholder tokens whose input
embeddings the trainer overwrites (hybrid item embeddings).

Raw ids (user id, item id, zip code) never appear in text (RecLoRA appendix C). Rendering is a pure
function of the sample record, the item/user tables and the style: no randomness, so evaluation
prompts are identical across runs (LLaRA picked one of three templates at random per batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import pyarrow as pa

from configs.errors import RecloraError
from configs.schema import CTR_FIELDS, CTR_REQUIRED, NEXT_ITEM_FIELDS, NEXT_ITEM_REQUIRED, template_problem

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# ML-1M stores age as a bucket code; ReLLa renders the bucket.
ML1M_AGE_LABELS = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}


class PromptError(RecloraError, ValueError):
    """A sample that cannot be rendered (unknown item text, a question longer than the budget)."""


@dataclass(frozen=True)
class PromptStyle:
    domain: str = "movie"
    domain_plural: str = "movies"
    verb_past: str = "watched"  # "He watched the following movies", "has watched"
    verb: str = "watch"  # "will watch"
    rating_unit: str = "stars"
    # Hybrid item embeddings (LLaRA): a token after each title whose embedding the trainer replaces.
    history_token: str | None = None
    candidate_token: str | None = None
    age_labels: Mapping[int, str] = field(default_factory=dict)
    # Whole-prompt templates (data.prompt.*_template, Python format strings); None: the papers' wording below.
    ctr_template: str | None = None
    next_item_template: str | None = None


DOMAINS: dict[str, PromptStyle] = {
    "movie": PromptStyle(),
    "song": PromptStyle("song", "songs", "listened to", "listen to"),
    "artist": PromptStyle("artist", "artists", "listened to", "listen to"),
    "book": PromptStyle("book", "books", "read", "read"),
    "game": PromptStyle("game", "games", "played", "play"),
}


# data.prompt keys -> PromptStyle fields.
_PROMPT_KEYS = {
    "items": "domain_plural",
    "verb_past": "verb_past",
    "verb": "verb",
    "rating_unit": "rating_unit",
    "ctr_template": "ctr_template",
    "next_item_template": "next_item_template",
}


def style_for(domain: str, prompt: Mapping[str, Any] | None = None, **overrides: Any) -> PromptStyle:
    """The style of `data.domain` (free text) with `data.prompt`'s words and templates, then `overrides`.
    A domain without built-in words gets neutral verbs ("interacted with") unless data.prompt says otherwise."""
    if not domain or not str(domain).strip():
        raise PromptError("data.domain: empty; say what an item is (movie, book, product, ...)")
    base = DOMAINS.get(domain) or PromptStyle(domain, f"{domain}s", "interacted with", "interact with")
    chosen = {_PROMPT_KEYS[k]: v for k, v in (prompt or {}).items() if k in _PROMPT_KEYS and v is not None}
    for key, fields, required in (
        ("ctr_template", CTR_FIELDS, CTR_REQUIRED),
        ("next_item_template", NEXT_ITEM_FIELDS, NEXT_ITEM_REQUIRED),
    ):
        problem = template_problem(chosen[key], fields, required) if key in chosen else None
        if problem:
            raise PromptError(f"data.prompt.{key}: {problem}")
    return replace(base, **{**chosen, **overrides})


@dataclass(frozen=True)
class Person:
    """How the history sentences refer to the user."""

    subject: str = "The user"  # sentence start
    pronoun: str = "the user"  # mid-sentence ("deduce if he will like")


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def profile(user: Mapping[str, Any] | None, style: PromptStyle) -> tuple[str, Person]:
    """ReLLa's profile sentence from whichever of gender/occupation/age exist (never id or zip)."""
    if not user:
        return "", Person()
    gender = user.get("gender")
    g = str(gender).strip().lower() if not _is_missing(gender) else ""
    g = {"m": "male", "f": "female", "man": "male", "woman": "female"}.get(g, g)
    parts = []
    if g in ("male", "female"):
        he, his = ("he", "his") if g == "male" else ("she", "her")
        parts.append(f"The user is a {g}.")
        person = Person(he.capitalize(), he)
        poss = his.capitalize()
    else:
        person = Person()
        poss = "The user's"
    job = user.get("occupation")
    if not _is_missing(job):
        parts.append(f"{poss} job is {job}.")
    age = user.get("age")
    if not _is_missing(age):
        if isinstance(age, (int, float)):
            age = style.age_labels.get(int(age), str(int(age)))
        parts.append(f"{poss} age is {age}.")
    return " ".join(parts), person


def _stars(rating: Any, style: PromptStyle) -> str:
    if _is_missing(rating):
        return ""
    return f" ({float(rating):g} {style.rating_unit})"


def _with_token(title: str, token: str | None) -> str:
    return f"{title} {token}" if token else title


def ctr_prompt(
    hist_titles: Sequence[str],
    hist_ratings: Sequence[Any],
    target_title: str,
    style: PromptStyle,
    user: Mapping[str, Any] | None = None,
) -> str:
    """ReLLa CTR prompt; the history is oldest first, numbered from 0."""
    head, person = profile(user, style)
    entries = [
        f"{i}. {_with_token(t, style.history_token)}{_stars(r, style)}"
        for i, (t, r) in enumerate(zip(hist_titles, hist_ratings))
    ]
    listing = "[" + ", ".join(repr(e) for e in entries) + "]"  # ReLLa prints str(list)
    if style.ctr_template is not None:
        return style.ctr_template.format(
            profile=head,
            subject=person.subject,
            pronoun=person.pronoun,
            history=listing,
            target=target_title,
            item=style.domain,
            items=style.domain_plural,
            verb_past=style.verb_past,
            verb=style.verb,
            rating_unit=style.rating_unit,
        )
    if head:
        lines = [
            head,
            f"{person.subject} {style.verb_past} the following {style.domain_plural} in order in the past, and rated them:",
        ]
    else:
        lines = [f"The user {style.verb_past} the following {style.domain_plural} in the past, and rated them:"]
    lines += [
        listing,
        f"Based on the {style.domain_plural} {person.pronoun} has {style.verb_past}, deduce if {person.pronoun} will like the "
        f"{style.domain} ***{target_title}***.",
        f"Note that more {style.rating_unit} the user rated the {style.domain}, the user like the {style.domain} more.",
        "You should ONLY tell me yes or no.",
    ]
    return "\n".join(lines)


def next_item_prompt(hist_titles: Sequence[str], cand_titles: Sequence[str], style: PromptStyle) -> str:
    """LLaRA next-item prompt; the answer is one candidate title."""
    hist = ", ".join(_with_token(t, style.history_token) for t in hist_titles)
    cans = ", ".join(_with_token(t, style.candidate_token) for t in cand_titles)
    if style.next_item_template is not None:
        return style.next_item_template.format(
            history=hist,
            candidates=cans,
            n_candidates=len(cand_titles),
            item=style.domain,
            items=style.domain_plural,
            verb_past=style.verb_past,
            verb=style.verb,
        )
    return (
        f"This user has {style.verb_past} {hist} in the previous. Please predict the next {style.domain} this user will "
        f"{style.verb}. Choose the answer from the following {len(cand_titles)} {style.domain} titles: {cans}. Answer:"
    )


def ctr_answer(label: int) -> str:
    return "Yes." if int(label) == 1 else "No."


def next_item_answer(title: str) -> str:
    return f"{title}\n"


def fit_history(
    render: Callable[[int], str], n_hist: int, count_tokens: Callable[[str], int], max_tokens: int
) -> tuple[str, int]:
    """The prompt keeping the most recent history items that fit in max_tokens.

    `render(m)` must render the prompt with the last m history items (the question always stays).
    Returns (text, m). Token count is monotone in m, so binary search: O(log n) tokenizer calls.
    """
    text = render(n_hist)
    if count_tokens(text) <= max_tokens:
        return text, n_hist
    lo, hi = 0, n_hist  # render(lo) fits (checked below), render(hi) does not
    if count_tokens(render(0)) > max_tokens:
        raise PromptError(
            f"the prompt without any history needs {count_tokens(render(0))} tokens, more than max_tokens={max_tokens}; "
            f"raise the model max_length"
        )
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_tokens(render(mid)) <= max_tokens:
            lo = mid
        else:
            hi = mid
    return render(lo), lo


@dataclass
class Rendered:
    text: str
    answer: str
    kept: int  # history items in the text
    truncated: bool


class PromptRenderer:
    """Renders sample records (dicts with the samples.SAMPLE_SCHEMA fields) into prompt + answer.

    Titles come from the dataset's items table by item id; the user profile from its users table.
    `missing_text="placeholder"` renders an item without a title as `placeholder.format(item_id=...)`;
    the default raises, listing the ids. Counts truncations in `self.truncated`.
    """

    def __init__(
        self,
        items: pa.Table,
        task: str,
        style: PromptStyle | None = None,
        users: pa.Table | None = None,
        missing_text: str = "error",
        placeholder: str = "an unknown item",
    ):
        if task not in ("ctr", "next_item"):
            raise PromptError(f"task must be 'ctr' or 'next_item', got {task!r}")
        if missing_text not in ("error", "placeholder"):
            raise PromptError(f"missing_text must be 'error' or 'placeholder', got {missing_text!r}")
        self.task = task
        self.style = style or PromptStyle()
        self.missing_text = missing_text
        self.placeholder = placeholder
        ids = items.column("item_id").to_pylist()
        titles = items.column("title").to_pylist()
        self.titles = {i: t for i, t in zip(ids, titles) if not _is_missing(t)}
        self.users: dict[int, dict[str, Any]] = {}
        if users is not None:
            cols = [c for c in ("gender", "age", "occupation") if c in users.column_names]
            data = {c: users.column(c).to_pylist() for c in cols}
            for j, uid in enumerate(users.column("user_id").to_pylist()):
                self.users[uid] = {c: data[c][j] for c in cols}
        self.truncated = 0
        self.rendered = 0

    def title(self, item_id: int) -> str:
        return self.titles_of([item_id])[0]

    def titles_of(self, item_ids: Sequence[int]) -> list[str]:
        out = []
        missing = []
        for i in item_ids:
            t = self.titles.get(i)
            if t is None:
                missing.append(i)
                t = self.placeholder
            out.append(t)
        if missing and self.missing_text == "error":
            raise PromptError(
                f"items table has no title for item id(s) {sorted(set(missing))[:20]}; fix the items file or set missing_text=placeholder"
            )
        return out

    def render(
        self, record: Mapping[str, Any], count_tokens: Callable[[str], int] | None = None, max_tokens: int | None = None
    ) -> Rendered:
        hist_ids = list(record["text_hist_items"] or [])
        hist_titles = self.titles_of(hist_ids)
        if self.task == "ctr":
            # No ratings at all (a null list) is a history without stars, never a history cut to nothing.
            ratings = list(record["text_hist_ratings"] or [None] * len(hist_ids))
            target = self.title(record["item_id"])
            user = self.users.get(record["user_id"])

            def build(m: int) -> str:
                return ctr_prompt(
                    hist_titles[len(hist_titles) - m :], ratings[len(ratings) - m :], target, self.style, user
                )

            answer = ctr_answer(record["label"]) if record.get("label") is not None else ""
        else:
            cands = record.get("candidates")
            if not cands:
                raise PromptError(f"sample {record.get('sample_id')}: next_item record without candidates")
            cand_titles = self.titles_of(cands)

            def build(m: int) -> str:
                return next_item_prompt(hist_titles[len(hist_titles) - m :], cand_titles, self.style)

            answer = next_item_answer(self.title(record["item_id"]))
        if count_tokens is None or max_tokens is None:
            text, kept = build(len(hist_ids)), len(hist_ids)
        else:
            text, kept = fit_history(build, len(hist_ids), count_tokens, max_tokens)
        truncated = kept < len(hist_ids)
        self.rendered += 1
        self.truncated += int(truncated)
        return Rendered(text, answer, kept, truncated)
