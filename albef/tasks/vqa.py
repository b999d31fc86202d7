"""VQA fine-tuning and evaluation with the answer decoder (paper §4.2; official ``VQA.py``, ``configs/VQA.yaml``).

    python -m finetune.vqa finetune/configs/vqa_v2.yaml init.checkpoint=ALBEF_4M.pth
    python -m finetune.vqa finetune/configs/vqa_v2.yaml init.checkpoint=vqa.pth train.evaluate_only=true

Model (``ALBEFVQA``): the 12-layer encoder reads question + image; a 6-layer causal decoder, initialised from the
pretrained fusion layers by ``albef.models.convert`` (layer k -> decoder layer k-6, embeddings and MLM head copied),
generates the answer while cross-attending to the question states.

Data, as the official files, under ``data.image_root`` (VQA / COCO) and ``data.vg_image_root`` (Visual Genome):

* train (``vqa_train.json``, ``vqa_val.json``, ``vg_qa.json``): ``[{"question", "answer": [answers] (vqa) | answer
  (vg), "image", "dataset": "vqa" | "vg"}]``. A VQA answer's weight is its count / the number of answers, a VG
  answer's 0.5; the loss is the weighted sum of the per-answer LM losses over the batch's questions.
* evaluation (``vqa_test.json``): ``[{"question_id", "question", "image", "dataset"}]`` and ``answer_list.json``
  (the candidates). Every question's answer is chosen by ``ALBEFVQA.rank_answer`` among the ``eval.k_test``
  candidates whose first token is most probable.

Evaluation writes ``<train.output_dir>/vqa_result_<split>.json`` = ``[{"question_id", "answer"}]``, the file the
EvalAI server takes (test-dev and test-std use the same file). When ground truth is at hand (``answer`` lists in
the split's file, as in ``vqa_val.json``, or ``data.test_answers``) it also reports the official VQA accuracy
(``albef.eval.vqa``). The official config evaluates only after the last epoch; so does ``vqa_v2.yaml``
(``train.eval_every_epochs`` = ``train.epochs``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from albef.data.finetune import MapLoader
from albef.data.json_dataset import read_json_list
from albef.data.transforms import AugmentConfig, stack_images, test_transform, to_device
from albef.engine import dist
from albef.engine.signals import until_stop
from albef.engine.task import RunConfig, Task
from albef.eval.priors import TextPrior, compare_with_prior, question_type
from albef.eval.vqa import load_vqa_answers, vqa_accuracy, vqa_score
from albef.fsutil import read_json
from albef.tasks.classifier import read_image
from albef.tokenizer import Tokenizer, pre_question

EOS = "[SEP]"  # appended to every answer: the decoder's end of sequence (official config `eos`)
VG_WEIGHT = 0.5


@dataclass
class VQADataConfig:
    train_files: List[str] = field(default_factory=list)  # vqa_train.json, vqa_val.json, vg_qa.json
    val_file: str = ""  # questions with "answer" lists: results + VQA accuracy
    test_file: str = ""  # vqa_test.json: results (+ accuracy with test_answers)
    test_answers: str = ""  # ground truth for test_file (official annotations or {question_id: [answers]})
    answer_list: str = ""  # answer_list.json: the candidates ranked at evaluation
    image_root: str = ""  # official vqa_root
    vg_image_root: str = ""  # official vg_root, for entries with "dataset": "vg"
    image_res: int = 384
    max_words: int = 30  # question words at training (official max_ques_words; evaluation keeps 50)
    max_question_len: int = 25  # question tokens at training (evaluation: no limit, as official)
    num_workers: int = 4
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # official fine-tuning: crop 0.5-1, flip, RandAugment


@dataclass
class VQAEvalConfig:
    batch_size: int = 16  # questions per rank and forward (official batch_size_test)
    k_test: int = 128  # candidates decoded in full per question


@dataclass
class VQAConfig(RunConfig):
    data: VQADataConfig = field(default_factory=VQADataConfig)
    eval: VQAEvalConfig = field(default_factory=VQAEvalConfig)


def _image_path(d: VQADataConfig, entry: Dict) -> str:
    root = d.vg_image_root if entry.get("dataset") == "vg" else d.image_root
    return os.path.join(root, entry["image"])


class VQATrainSet:
    """Official train files -> ``(image path, question, answers, weights)``; ``load(i, rng)`` for ``MapLoader``."""

    def __init__(self, d: VQADataConfig):
        self.items = []
        for path in d.train_files:
            for i, e in enumerate(read_json_list(path, ("question", "answer", "image"))):
                if e.get("dataset") == "vg":
                    if not isinstance(e["answer"], str):
                        raise ValueError(f"{path}[{i}]: a VG entry's 'answer' must be a string, got {e['answer']!r}")
                    answers, weights = [e["answer"]], [VG_WEIGHT]
                else:
                    if not (isinstance(e["answer"], list) and e["answer"]):
                        raise ValueError(
                            f"{path}[{i}]: a VQA entry's 'answer' must be a non-empty list, got {e['answer']!r}"
                        )
                    counts = Counter(e["answer"])  # insertion order: first occurrence, as the official dict
                    answers, weights = list(counts), [c / len(e["answer"]) for c in counts.values()]
                question = pre_question(e["question"], d.max_words)
                self.items.append((_image_path(d, e), question, [a + EOS for a in answers], weights))
        self.transform = d.augment.transform(d.image_res)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int, rng) -> Dict:
        path, question, answers, weights = self.items[index]
        return {
            "image": read_image(path, self.transform, rng),
            "question": question,
            "answers": answers,
            "weights": weights,
        }


class VQAEvalSet(Dataset):
    """An evaluation file: ``[{"question_id", "question", "image", ...}]``, with ground truth where it has answers."""

    def __init__(self, path: str, d: VQADataConfig, answers_file: str = ""):
        entries = read_json_list(path, ("question_id", "question", "image"))
        self.items = [(_image_path(d, e), pre_question(e["question"], 50), e["question_id"]) for e in entries]
        self.ground_truth: Optional[Dict[str, List[str]]] = None
        if answers_file:
            self.ground_truth = load_vqa_answers(answers_file)
        elif entries and all(isinstance(e.get("answer"), list) for e in entries):
            self.ground_truth = {str(e["question_id"]): e["answer"] for e in entries}
        self.transform = test_transform(d.image_res)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, question, qid = self.items[index]
        return read_image(path, self.transform, None), question, qid, index


def _eval_collate(samples):
    """``VQAEvalSet`` items -> (uint8 pixels, questions, question ids, indices)."""
    images, questions, qids, indices = zip(*samples)
    return stack_images(images), questions, qids, indices


def read_answer_list(path: str) -> List[str]:
    if not path:
        raise ValueError("data.answer_list is empty: VQA evaluation ranks the answers of answer_list.json")
    answers = read_json(path, "data.answer_list")
    if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
        raise ValueError(f"data.answer_list={path}: expected a non-empty JSON list of answer strings")
    return answers


class VQATask(Task):
    name = "vqa"
    model_kind = "vqa"
    config_cls = VQAConfig
    eval_splits = ("val", "test")
    primary_metric = "acc"

    def __init__(self, cfg: VQAConfig):
        super().__init__(cfg)
        self._eval_sets: Dict[str, VQAEvalSet] = {}
        self._answers = None
        self._text_prior: Optional[TextPrior] = None
        self._tokenizer = Tokenizer()

    def build_train_loader(self, tokenizer, rank, world_size, micro_batch_size, seed):
        d = self.cfg.data
        self.train_files()

        def collate(samples: List[Dict]) -> Dict:
            q = tokenizer([s["question"] for s in samples], max_length=d.max_question_len)
            a = tokenizer([a for s in samples for a in s["answers"]], max_length=None)
            return {
                "image": stack_images([s["image"] for s in samples]),
                "question_ids": q["input_ids"],
                "question_mask": q["attention_mask"],
                "answer_ids": a["input_ids"],
                "answer_mask": a["attention_mask"],
                "weights": torch.tensor([w for s in samples for w in s["weights"]]),
                "n": torch.tensor([len(s["answers"]) for s in samples]),
            }

        return MapLoader(VQATrainSet(d), collate, micro_batch_size, rank, world_size, seed, d.num_workers)

    def training_step(self, model, batch, progress):
        out = model(
            batch["image"],
            batch["question_ids"],
            batch["question_mask"],
            batch["answer_ids"],
            batch["answer_mask"],
            batch["weights"],
            batch["n"],
            alpha=progress.alpha,
        )
        return out["loss_vqa"], {}

    def check_batch_geometry(self, model_cfg, global_micro_batch) -> None:
        """No queues in the VQA model: any batch size works."""

    def _eval_data(self, split: str):
        d = self.cfg.data
        if self._answers is None:
            answers = read_answer_list(d.answer_list)
            self._answers = (answers, self._tokenizer([a + EOS for a in answers], max_length=None))
        if split not in self._eval_sets:
            answers_file = d.test_answers if split == "test" else ""
            self._eval_sets[split] = VQAEvalSet(getattr(d, f"{split}_file"), d, answers_file)
        return self._eval_sets[split], self._answers

    @torch.no_grad()
    def evaluate(self, model, split, device, dtype) -> Dict[str, float]:
        ds, (answers, answer_tokens) = self._eval_data(split)
        answer_ids, answer_mask = answer_tokens["input_ids"].to(device), answer_tokens["attention_mask"].to(device)
        loader = DataLoader(
            torch.utils.data.Subset(ds, dist.rank_share(len(ds))),
            batch_size=self.cfg.eval.batch_size,
            num_workers=self.cfg.data.num_workers,
            collate_fn=_eval_collate,
        )
        mine = []
        for images, questions, qids, indices in until_stop(loader):
            q = self._tokenizer(list(questions), max_length=None)
            q_ids, q_mask = q["input_ids"].to(device), q["attention_mask"].to(device)
            states = model.encode_question(to_device(images, device, dtype), q_ids, q_mask)
            best, _, _ = model.rank_answer(states, q_mask, answer_ids, answer_mask, self.cfg.eval.k_test)
            mine += [(i, qid, answers[b]) for i, qid, b in zip(indices, qids, best.tolist())]
        results = [{"question_id": qid, "answer": a} for _, qid, a in sorted(dist.gather_lists(mine))]
        if dist.is_main():
            out = Path(self.cfg.train.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"vqa_result_{split}.json").write_text(json.dumps(results))
        if ds.ground_truth is None:
            return {"num_questions": float(len(results))}
        metrics = vqa_accuracy(results, ds.ground_truth)
        if self.cfg.data.train_files:  # the question-only prior, overall and per question type
            questions = {qid: q for _, q, qid in ds.items}
            qs = [questions[r["question_id"]] for r in results]
            metrics.update(
                compare_with_prior(
                    [ds.ground_truth[str(r["question_id"])] for r in results],
                    qs,
                    [question_type(q) for q in qs],
                    [r["answer"] for r in results],
                    self._prior(),
                    vqa_score,
                )
            )
        return metrics

    def _prior(self) -> TextPrior:
        """The question-only prior of the train files: most common answer per question string, else per type."""
        if self._text_prior is None:
            items = VQATrainSet(self.cfg.data).items
            self._text_prior = TextPrior(
                (q, question_type(q), {a[: -len(EOS)]: w for a, w in zip(answers, weights)})
                for _, q, answers, weights in items
            )
        return self._text_prior
