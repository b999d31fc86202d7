"""Text-only priors: what a model that never looks at the image scores, computed from the train file alone.

A fusion task's accuracy means little until it is compared with the best answer the text alone gives. These are
the standard cheap baselines of the field (the "question-only" VQA prior of Goyal et al. 2017, hypothesis-only
SNLI-VE / NLI baselines, the sentence-only NLVR2 prior):

* ``TextPrior``: the most frequent label of each exact text (a question string, a hypothesis, a sentence) in the
  train file, falling back to the most frequent label of the text's *type*, then of the whole file. Ties go to the
  label seen first in the file, so the prior is deterministic.
* ``question_type``: the first two words of the normalised question ("what color", "how many", "is there",
  "where is"): the same split VQA v2's per-type tables use, coarser than its 65 prefixes but defined for any data.
* ``per_type_accuracy``: a score per item, averaged per type, so a task reports "colour questions: model 92%,
  prior 15%" instead of one overall number that a yes/no majority can hide in.

The VQA, SNLI-VE and NLVR2 tasks report ``prior_acc`` and per-type ``acc_<type>`` / ``prior_acc_<type>`` beside
their accuracy on every evaluated split that has labels.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Callable, Dict, Hashable, Iterable, Mapping, Optional, Sequence, Tuple

from albef.tokenizer import pre_question


def question_type(question: str) -> str:
    """The question's type: its first two normalised words ("what color", "how many", "is there")."""
    return " ".join(pre_question(question).split()[:2])


def metric_key(kind: str) -> str:
    """A type as part of a metric name: ``what color`` -> ``what_color``."""
    return re.sub(r"\W+", "_", kind).strip("_") or "other"


class TextPrior:
    """Most frequent label per exact text, else per type, else overall (see the module docstring)."""

    def __init__(self, examples: Iterable[Tuple[str, str, Mapping[Hashable, float]]]):
        """``examples``: (text, type, {label: weight}); a single-label example is ``{label: 1.0}``."""
        self.by_text: Dict[str, Counter] = defaultdict(Counter)
        self.by_type: Dict[str, Counter] = defaultdict(Counter)
        self.overall: Counter = Counter()
        for text, kind, labels in examples:
            for label, weight in labels.items():
                self.by_text[text][label] += weight
                self.by_type[kind][label] += weight
                self.overall[label] += weight
        if not self.overall:
            raise ValueError("a text prior needs at least one labelled training example")

    @staticmethod
    def _top(counts: Counter):
        return max(counts.items(), key=lambda kv: kv[1])[0]  # the first of equal counts: file order

    def predict(self, text: str, kind: Optional[str] = None):
        if text in self.by_text:
            return self._top(self.by_text[text])
        if kind is not None and kind in self.by_type:
            return self._top(self.by_type[kind])
        return self._top(self.overall)

    def source(self, text: str, kind: Optional[str] = None) -> str:
        """Which level answered: 'text', 'type' or 'overall' (how much of a split the train file covers)."""
        return "text" if text in self.by_text else "type" if kind in self.by_type else "overall"


def per_type_accuracy(scores: Sequence[float], types: Sequence[str], prefix: str = "acc") -> Dict[str, float]:
    """``{prefix: mean, prefix_<type>: mean per type}`` in percent, of per-item scores in [0, 1]."""
    if len(scores) != len(types):
        raise ValueError(f"{len(scores)} scores for {len(types)} types")
    if not scores:
        return {}
    groups: Dict[str, list] = defaultdict(list)
    for s, t in zip(scores, types):
        groups[t].append(s)
    out = {prefix: 100.0 * sum(scores) / len(scores)}
    for t in sorted(groups):
        out[f"{prefix}_{metric_key(t)}"] = 100.0 * sum(groups[t]) / len(groups[t])
    return out


def compare_with_prior(
    truth: Sequence,
    texts: Sequence[str],
    types: Sequence[str],
    predictions: Sequence,
    prior: TextPrior,
    score: Callable = lambda p, t: float(p == t),
) -> Dict[str, float]:
    """The model's and the prior's accuracy, overall and per type, on one labelled split."""
    model = [score(p, t) for p, t in zip(predictions, truth)]
    base = [score(prior.predict(x, k), t) for x, k, t in zip(texts, types, truth)]
    return {**per_type_accuracy(model, types, "acc"), **per_type_accuracy(base, types, "prior_acc")}
