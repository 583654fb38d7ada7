"""Question sets for live runs (``../shared/data/questions/``), their prompts and their graders.

Graders (pure functions, tested on real rows):

* multiple choice (ARC-Easy/Challenge, BoolQ, CommonsenseQA, OpenBookQA, MMLU): **letter match**. The answer
  letter is read from the start of the reply (``B``, ``(B)``, ``B. text``), else from "answer is B", else from a
  reply that is exactly one option's text; anything else is an empty (wrong) answer.
* GSM8K: **numeric match**. The number after the last ``####``, else after "answer is", else the last number
  in the reply, compared with the gold ``#### n`` as a float (``$`` and thousands separators ignored: ``1,234``
  is one number, ``1,2,3`` three; a minus sign counts only attached to the number: ``12 - 4`` ends in 4).
* TriviaQA: **alias match**. The reply's first line, normalised like SQuAD (lower case, no punctuation, no
  articles), is right when it equals a normalised alias or contains one as a whole-word sequence.

BoolQ is asked as a two-option question (A. no / B. yes) so that one letter grader covers every
multiple-choice set.
"""

from __future__ import annotations

import csv
import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LETTERS = "ABCDEFGH"

MC_SYSTEM = "Answer the multiple-choice question. Reply with the letter of the correct option only."
GSM8K_SYSTEM = ("Solve the math word problem without writing any code. Show the arithmetic in a few short lines, "
                "then give the final answer as a plain number on its own last line, in the form '#### <number>'.")
TRIVIA_SYSTEM = "Answer the trivia question with the answer only: a few words, not a sentence."

#: the prompt set's version: part of the cache key, so changed prompts never reuse old answers
PROMPT_VERSION = 1


@dataclass(frozen=True)
class QuestionSet:
    name: str
    kind: str  # "mc" | "numeric" | "alias"
    path: str  # relative to the data folder's questions/
    max_tokens: int
    stop: tuple[str, ...] = ()


QUESTION_SETS: dict[str, QuestionSet] = {
    "arc_easy": QuestionSet("arc_easy", "mc", "arc_easy.jsonl", 5, ("\n",)),
    "arc_challenge": QuestionSet("arc_challenge", "mc", "arc_challenge.jsonl", 5, ("\n",)),
    "boolq": QuestionSet("boolq", "mc", "boolq.jsonl", 5, ("\n",)),
    "commonsense_qa": QuestionSet("commonsense_qa", "mc", "commonsense_qa.jsonl", 5, ("\n",)),
    "openbook_qa": QuestionSet("openbook_qa", "mc", "openbook_qa.jsonl", 5, ("\n",)),
    "mmlu": QuestionSet("mmlu", "mc", "mmlu/test", 5, ("\n",)),
    "gsm8k": QuestionSet("gsm8k", "numeric", "gsm8k/test.jsonl", 192),
    "triviaqa": QuestionSet("triviaqa", "alias", "triviaqa_sm_sub.jsonl", 12, ("\n",)),
}


@dataclass
class Question:
    dataset: str
    idx: int  # line (or row) of the source: stable across runs
    kind: str
    system_prompt: str
    user_prompt: str
    gold: Any  # letter, float, or list of aliases
    source_example: dict[str, Any]
    max_tokens: int
    stop: tuple[str, ...] = ()
    choices: list[str] = field(default_factory=list)


# --- loading ---------------------------------------------------------------------------------------


def _mc_prompt(question: str, choices: Sequence[str]) -> str:
    letters = LETTERS[: len(choices)]
    opts = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(choices))
    return f"{question.strip()}\n\n{opts}\n\nAnswer with {_or(letters)}."


def _or(letters: str) -> str:
    return ", ".join(letters[:-1]) + f" or {letters[-1]}" if len(letters) > 1 else letters


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def load_question_set(name: str, data_dir: str | Path) -> list[Question]:
    """Every question of one set, in source order."""
    try:
        qs = QUESTION_SETS[name]
    except KeyError:
        raise ValueError(f"unknown question set {name!r}; known: {', '.join(QUESTION_SETS)}") from None
    root = Path(data_dir) / "questions"
    path = root / qs.path
    if not path.exists():
        raise FileNotFoundError(f"question set {name!r} not found at {path}")
    out: list[Question] = []
    if name == "mmlu":
        i = 0
        for f in sorted(path.glob("*.csv")):
            subject = f.stem.removesuffix("_test")
            with f.open(newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    choices = [row[f"choice{k}"] for k in range(4)]
                    gold = LETTERS[int(row["answer"])]
                    out.append(Question(name, i, "mc", MC_SYSTEM, _mc_prompt(row["question"], choices), gold,
                                        {"question": row["question"], "subject": subject, "choices": choices,
                                         "answer": int(row["answer"])}, qs.max_tokens, qs.stop, choices))
                    i += 1
        return out
    rows = _jsonl(path)
    for i, r in enumerate(rows):
        if qs.kind == "mc":
            choices = [str(c) for c in r["choices"]]
            query = str(r["query"])
            if all(len(c) == 1 and c in LETTERS for c in choices):
                # the options are written in the query (CommonsenseQA): keep them, drop the "Answer:" cue
                body = re.sub(r"\s*Answer:\s*$", "", query.strip())
                user = f"{body}\n\nAnswer with {_or(LETTERS[: len(choices)])}."
                texts = [m.group(1).strip() for m in re.finditer(r"^[A-H]\.\s*(.*)$", body, re.M)]
                texts = texts if len(texts) == len(choices) else []
            else:
                q = re.sub(r"^Question:\s*", "", query.strip())
                user = _mc_prompt(q, choices)
                texts = choices
            gold = LETTERS[int(r["gold"])]
            out.append(Question(name, i, "mc", MC_SYSTEM, user, gold, dict(r), qs.max_tokens, qs.stop, texts))
        elif qs.kind == "numeric":
            gold = gsm8k_gold(r["answer"])
            out.append(Question(name, i, "numeric", GSM8K_SYSTEM, str(r["question"]).strip(), gold, dict(r),
                                qs.max_tokens, qs.stop))
        else:
            q = re.sub(r"\s*Answer:\s*$", "", str(r["context"]).strip())
            aliases = [str(a) for a in (r.get("aliases") or [])] or [str(r["answer"])]
            out.append(Question(name, i, "alias", TRIVIA_SYSTEM, q, aliases, dict(r), qs.max_tokens, qs.stop))
    return out


def sample_questions(questions: Sequence[Question], n: int, seed: int = 0) -> list[tuple[int, Question]]:
    """A seeded sample of ``n`` questions, each with its rank in the seeded permutation.

    The permutation depends only on the seed and the set's size, so a larger ``n`` extends a smaller one:
    answers cached for the first ``n`` questions are reused when ``n`` grows.
    """
    perm = np.random.default_rng(seed).permutation(len(questions))
    n = min(int(n), len(questions))
    return [(rank, questions[int(j)]) for rank, j in enumerate(perm[:n])]


# --- graders ---------------------------------------------------------------------------------------

_LEAD = re.compile(r"^\s*(?:\*\*)?[\(\[]?([A-H])(?:[\)\]\.:,\*]|\s|$)")
_SAID = re.compile(r"(?:answer|option|choice)\s*(?:is|would be|:)?\s*:?\s*[\(\[]?\*{0,2}([A-H])\b", re.I)


def parse_letter(response: str, n_choices: int, choices: Sequence[str] = ()) -> tuple[str, int]:
    """(letter, character offset of the letter in ``response``); ("", -1) when none can be read."""
    valid = LETTERS[:n_choices]
    text = response or ""
    m = _LEAD.match(text)
    if m and m.group(1) in valid:
        return m.group(1), m.start(1)
    for m in _SAID.finditer(text):
        letter = m.group(1).upper()
        if letter in valid and m.group(1).isupper():
            return letter, m.start(1)
    norm = normalize_text(text)
    if norm:
        for i, c in enumerate(choices[:n_choices]):
            if normalize_text(c) == norm:
                return valid[i], 0
    return "", -1


def grade_letter(response: str, gold: str, n_choices: int, choices: Sequence[str] = ()) -> tuple[str, bool, int]:
    letter, offset = parse_letter(response, n_choices, choices)
    return letter, bool(letter) and letter == gold, offset


#: a number: a minus sign only when attached to it (not "12 - 4", not the "-" of "12-4"), an optional "$", commas
#: only as thousands separators ("1,234", "12,345,678"; "1,2,3" is three numbers), an optional decimal part
_NUM = r"(?:(?<![\w)\]])-)?(?:\$\s*)?(?<!\d)(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"


def _to_float(s: str) -> float | None:
    s = s.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        return float(s)
    except ValueError:
        return None


def gsm8k_gold(answer: str) -> float:
    m = re.search(r"####\s*(" + _NUM + ")", answer)
    if not m:
        raise ValueError(f"no '#### n' in GSM8K answer {answer[-40:]!r}")
    v = _to_float(m.group(1))
    if v is None:
        raise ValueError(f"cannot read the GSM8K gold number in {m.group(0)!r}")
    return v


def parse_number(response: str) -> float | None:
    text = response or ""
    hashes = list(re.finditer(r"####\s*(" + _NUM + ")", text))
    if hashes:
        return _to_float(hashes[-1].group(1))
    said = list(re.finditer(r"answer is\s*:?\s*(" + _NUM + ")", text, re.I))
    if said:
        return _to_float(said[-1].group(1))
    nums = re.findall(_NUM, text)
    return _to_float(nums[-1]) if nums else None


def grade_numeric(response: str, gold: float) -> tuple[str, bool]:
    v = parse_number(response)
    if v is None:
        return "", False
    shown = str(int(v)) if float(v).is_integer() else repr(v)
    return f"#### {shown}", abs(v - gold) < 1e-6


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"‘", "’", "“", "”"}


def normalize_text(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in (s or "").lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def short_answer(response: str) -> str:
    line = (response or "").strip().split("\n", 1)[0]
    return re.sub(r"^\s*(?:answer|a)\s*:\s*", "", line, flags=re.I).strip()


def grade_alias(response: str, aliases: Sequence[str]) -> tuple[str, bool]:
    ans = short_answer(response)
    na = normalize_text(ans)
    if not na:
        return ans, False
    padded = f" {na} "
    for a in aliases:
        nb = normalize_text(a)
        if nb and (nb == na or f" {nb} " in padded):
            return ans, True
    return ans, False


def grade(q: Question, response: str) -> tuple[str, bool, int]:
    """(answer as stored, correct, character offset of a multiple-choice letter or -1)."""
    if q.kind == "mc":
        return grade_letter(response, q.gold, len(q.source_example.get("choices", q.choices)) or len(q.choices),
                            q.choices)
    if q.kind == "numeric":
        a, ok = grade_numeric(response, q.gold)
        return a, ok, -1
    a, ok = grade_alias(response, q.gold)
    return a, ok, -1
