"""VQA accuracy as the official VQA v2 evaluation computes it, so a number can be seen without the EvalAI server.

    from albef.eval.vqa import load_vqa_answers, vqa_accuracy
    vqa_accuracy([{"question_id": 1, "answer": "two"}], {"1": ["2"] * 10})   # {'acc': 100.0, 'num_questions': 1}

* **Answer normalisation** (``normalize_answer``), the rules of the official ``vqaEval.py`` / EvalAI answer
  processor: lower-case; newlines/tabs -> spaces; each punctuation mark of ``; / [ ] " { } ( ) = + \\ _ - > < @ `
  , ? !`` is deleted where it touches a space (or when the answer has a digit-comma-digit group) and replaced by a
  space elsewhere; a period not followed by a digit is deleted; number words ``none``/``zero``..``ten`` become
  digits; the articles ``a an the`` are dropped; apostrophe-less contractions get their apostrophes back
  (``dont`` -> ``don't``).
* **Score of one answer** (``vqa_score``): the average, over the 10 ways of leaving one human answer out, of
  ``min(1, #remaining humans who gave this answer / 3)``: the common "min(#humans agreeing / 3, 1)" made robust to
  annotator choice. With 10 humans, 0/1/2/3/>=4 agreeing give 0, 0.3, 0.6, 0.9, 1.
  One deliberate simplification: the official script normalises the human answers only when they disagree; we
  normalise both sides always (identical whenever the human answers are already normalised, as in VQA v2).
* ``vqa_accuracy`` averages the scores over the questions (in percent, like the server); ``load_vqa_answers`` reads
  ground truth in the official annotation layout, as ``{question_id: [answers]}`` or from our VQA JSON entries.
"""

from __future__ import annotations

import itertools
import re
from typing import Dict, List, Mapping, Sequence

from albef.fsutil import read_json

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")

# Contractions with their apostrophes. Every spelling that drops some of the apostrophes maps back to these, except
# spellings that are ordinary words (its, ill, well, were, ...), which must stay as they are.
_CONTRACTIONS = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he'll he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't
mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've she's should've shouldn't
shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd
something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've
'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've
who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've
you'll you're you've""".split()
_REAL_WORDS = {"its", "ill", "well", "were", "wed", "hell", "shell", "shed", "id", "lets"}


def _contraction_map() -> Dict[str, str]:
    table = {}
    for word in _CONTRACTIONS:
        cuts = [i for i, c in enumerate(word) if c == "'"]
        for r in range(1, len(cuts) + 1):
            for drop in itertools.combinations(cuts, r):
                variant = "".join(c for i, c in enumerate(word) if i not in drop)
                if variant not in _REAL_WORDS:
                    table[variant] = word
    return table


CONTRACTIONS = _contraction_map()


def _punctuation(text: str) -> str:
    out = text
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if digit_comma or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official answer processing (see the module docstring)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    return _digits_articles_contractions(_punctuation(text))


def vqa_score(prediction: str, human_answers: Sequence[str]) -> float:
    """Official per-question accuracy in [0, 1] of ``prediction`` against the human answers (usually 10)."""
    if not human_answers:
        raise ValueError("vqa_score needs at least one human answer")
    pred = normalize_answer(prediction)
    humans = [normalize_answer(a) for a in human_answers]
    if len(humans) == 1:
        return float(humans[0] == pred)  # a single reference (e.g. VG-style data): exact match
    scores = []
    for left_out in range(len(humans)):
        agreeing = sum(1 for i, a in enumerate(humans) if i != left_out and a == pred)
        scores.append(min(1.0, agreeing / 3))
    return sum(scores) / len(scores)


def vqa_accuracy(results: Sequence[Mapping], ground_truth: Mapping[str, Sequence[str]]) -> Dict[str, float]:
    """``{'acc': percent, 'num_questions': n}`` of results ``[{question_id, answer}]`` against ground truth
    ``{str(question_id): [answers]}``.

    Every result must have ground truth: a result whose question is unknown is an error naming it (a result file
    and an annotation file of different splits would otherwise give a meaningless number).
    """
    unknown = [r["question_id"] for r in results if str(r["question_id"]) not in ground_truth]
    if unknown:
        raise ValueError(
            f"{len(unknown)} result(s) have no ground-truth answers, e.g. question_id {unknown[:5]}: "
            "is the answer file of the same split?"
        )
    if not results:
        raise ValueError("vqa_accuracy: no results")
    total = sum(vqa_score(r["answer"], ground_truth[str(r["question_id"])]) for r in results)
    return {"acc": 100.0 * total / len(results), "num_questions": len(results)}


def load_vqa_answers(path: str) -> Dict[str, List[str]]:
    """Ground truth as ``{str(question_id): [answers]}`` from any of: the official VQA v2 annotation file
    (``{"annotations": [{"question_id", "answers": [{"answer": ...}]}]}``), a plain ``{question_id: [answers]}``
    mapping (the demo world's ``vqa_test_answers.json``), or our VQA JSON (``[{"question_id", "answer": [...]}]``)."""
    data = read_json(path, "VQA answer file")
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        try:
            return {str(a["question_id"]): [x["answer"] for x in a["answers"]] for a in data["annotations"]}
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: annotation entries need question_id and answers[].answer ({e})") from None
    if isinstance(data, list):
        bad = [
            i
            for i, e in enumerate(data)
            if not (isinstance(e, dict) and "question_id" in e and isinstance(e.get("answer"), list))
        ]
        if bad:
            raise ValueError(f"{path}[{bad[0]}]: expected {{'question_id', 'answer': [answers]}}")
        return {str(e["question_id"]): list(e["answer"]) for e in data}
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        return {str(k): list(v) for k, v in data.items()}
    raise ValueError(
        f"{path}: not a VQA answer file (official annotations, {{question_id: [answers]}} or a list of "
        "{'question_id', 'answer': [...]})"
    )
