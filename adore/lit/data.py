"""Training sequences (prompt + reference) for the `finetune` and `labels` stages.

A sequence is the chat template of `record["messages"]` with the generation prompt, then the reference and
the end-of-turn token; the loss (finetune) covers only the reference and that token. Batches are padded on
the right, so causal attention of real tokens never sees padding.
"""

from __future__ import annotations

import dataclasses
import logging

import lightning as L
import torch
from torch.utils.data import DataLoader

from adore.checks import check_integer
from adore.data import DataSpec, load_records
from adore.models import ModelSpec, load_tokenizer
from adore.ruler import check_variants_and_lengths, haystack_sentences, make_example

log = logging.getLogger(__name__)
IGNORE = -100  # label of tokens without loss (the prompt, padding)


def encode_document(tokenizer, record: dict, max_length: int) -> list[dict]:
    """A document (no messages: WikiText) as consecutive windows of max_length tokens, every token a target."""
    ids = tokenizer(record["reference"])["input_ids"]
    windows = [ids[s : s + max_length] for s in range(0, len(ids), max_length)]
    return [
        {"id": f"{record['id']}/{k}", "input_ids": w, "labels": list(w)} for k, w in enumerate(windows) if len(w) > 1
    ]


def encode_example(tokenizer, record: dict, max_length: int) -> dict | None:
    """Token ids and loss labels of one record, cut at max_length; None when no reference token is left."""
    prompt = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(record["reference"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + target_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + target_ids)[:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return {"id": record["id"], "input_ids": ids, "labels": labels}


def ruler_sequences(tokenizer, haystack: list[str], variants, lengths, num_examples: int, seed: int) -> list[dict]:
    """RULER examples (`adore.ruler`) as training sequences: the user turn holding context and question, then the
    answer prefix and every reference as the reply, each fitted to its length in tokens. The draws are seeded by
    `seed`: one other than the evaluation's (`task.seed`, 0) gives other keys, values and haystack windows."""

    def encode(ex) -> dict:  # never cut: the example is fitted to its length instead
        reply = f"{ex.answer_prefix} {', '.join(ex.references)}."
        record = {"id": f"{ex.id}-seed{seed}", "messages": [{"role": "user", "content": ex.text()}], "reference": reply}
        return encode_example(tokenizer, record, max_length=2**62)

    out = []
    for variant in variants:
        for length in lengths:
            hint = None
            for index in range(num_examples):
                ex = make_example(
                    variant, length, index, haystack, lambda e: len(encode(e)["input_ids"]), seed, hint=hint
                )
                hint = ex.units
                out.append(encode(ex))
    return out


def check_ruler(ruler: dict) -> None:
    """`stage.datamodule.ruler`: variants and lengths as `task=ruler` takes them, a count, an integer seed."""
    check_variants_and_lengths("stage.datamodule.ruler", ruler.get("variants"), ruler.get("lengths"))
    check_integer("stage.datamodule.ruler.num_examples", ruler.get("num_examples"), fix=" (per variant and length)")
    check_integer("stage.datamodule.ruler.seed", ruler.get("seed"), 0, fix=" (the evaluation uses 0: pick another)")


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a list of encoded examples: input_ids, labels, attention_mask (B, T) and the record ids."""
    T = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), T), pad_id, dtype=torch.long),
        "labels": torch.full((len(examples), T), IGNORE, dtype=torch.long),
        "attention_mask": torch.zeros(len(examples), T, dtype=torch.long),
    }
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n] = torch.tensor(e["input_ids"])
        batch["labels"][row, :n] = torch.tensor(e["labels"])
        batch["attention_mask"][row, :n] = 1
    batch["id"] = [e["id"] for e in examples]
    return batch


class _Collate:
    """Picklable collate function (DataLoader workers)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples):
        return collate(examples, self.pad_id)


class SequenceDataModule(L.LightningDataModule):
    """Train: the task's `train` partition; val: the first `num_val` records of its `eval` partition;
    predict (labels stage): the train sequences, longest first (padding waste is lowest, memory peaks early).

    `ruler` ({variants, lengths, num_examples, seed}): RULER examples instead of the data's records, the data's
    documents (wikitext2, noise) their haystack: long sequences whose answers read a needle far back.
    """

    def __init__(
        self,
        data: DataSpec,
        model: ModelSpec,
        num_train: int | None = None,
        num_val: int = 32,
        max_length: int = 384,
        batch_size: int = 4,
        num_workers: int = 0,
        ruler: dict | None = None,
    ):
        super().__init__()
        if ruler is not None:
            ruler = dict(ruler)
            check_ruler(ruler)
        if ruler is not None and max(ruler["lengths"]) > max_length:
            raise ValueError(
                f"stage.datamodule.ruler.lengths={ruler['lengths']} reach past stage.datamodule.max_length="
                f"{max_length}: raise it to {max(ruler['lengths'])}"
            )
        self.ruler = ruler
        self.data, self.model = data, model
        self.num_train, self.num_val, self.max_length = num_train, num_val, max_length
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []

    def _encode(self, split: str, num: int | None) -> list[dict]:
        """The first `num` sequences of a partition: one per record (prompt + reference), or for documents
        (WikiText: no messages) their consecutive windows of max_length tokens."""
        spec = dataclasses.replace(self.data, split=split)
        records = load_records(spec)
        if self.ruler is not None:
            if any(r["messages"] for r in records):
                raise ValueError(
                    f"stage.datamodule.ruler reads its haystack from documents, and data={self.data.name} holds "
                    "conversations: use data=wikitext2 or data=noise"
                )
            haystack = haystack_sentences([r["reference"] for r in records])
            r = self.ruler
            kept = ruler_sequences(self.tokenizer, haystack, r["variants"], r["lengths"], r["num_examples"], r["seed"])
            return kept[:num]
        if records and not records[0]["messages"]:
            kept = [w for r in records for w in encode_document(self.tokenizer, r, self.max_length)][:num]
        else:
            records = records if num is None else records[:num]
            kept = [e for e in (encode_example(self.tokenizer, r, self.max_length) for r in records) if e is not None]
            if len(kept) < len(records):
                log.warning(
                    "%s/%s: dropped %d records whose prompt fills max_length=%d",
                    self.data.name,
                    split,
                    len(records) - len(kept),
                    self.max_length,
                )
        if not kept:
            raise ValueError(f"no usable {self.data.name}/{split} sequence at max_length={self.max_length}: raise it")
        return kept

    def setup(self, stage: str | None = None):
        if self.train_set:
            return
        self.tokenizer = load_tokenizer(self.model)
        self.train_set = self._encode("train", self.num_train)

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=_Collate(self.tokenizer.pad_token_id),
        )

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        if not self.val_set:
            self.val_set = self._encode("eval", self.num_val)
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self):
        return self._loader(sorted(self.train_set, key=lambda e: -len(e["input_ids"])), shuffle=False)
