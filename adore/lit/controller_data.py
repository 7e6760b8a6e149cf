"""The data of stage `controller` (ADORE.md §2): the sequences of one or more labels files, pooled, with a seeded
hold-out, and (t, i) pairs sampled from their top-K labels; and the cache of backbone residual streams beside each
labels file (`ResidualCache`), for controllers that read a hidden layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from adore.checks import check_positive
from adore.io import save_torch
from adore.lit.label_builder import load_labels, sample_pairs
from adore.models import ModelSpec


class ControllerDataModule(L.LightningDataModule):
    """Sequences of a labels file; `num_val` of them (seeded) are held out. Pairs are re-sampled every epoch.

    `mixture` (one weight per labels file): the share of training draws from each file, drawn with replacement,
    instead of every sequence once per epoch; so that a few long sequences are not drowned by many short ones.
    """

    def __init__(
        self,
        labels: str | list[str],
        num_val: int = 24,
        batch_size: int = 8,
        pairs_per_sequence: int = 256,
        pos_fraction: float = 0.5,
        num_workers: int = 0,
        seed: int = 0,
        mixture: list[float] | None = None,
    ):
        super().__init__()
        self.paths = [labels] if isinstance(labels, str) else list(labels)
        if not self.paths:
            raise ValueError("stage.datamodule.labels is empty: give labels.pt files or labels run folders")
        if mixture is not None:
            mixture = list(mixture)
            if len(mixture) != len(self.paths):
                raise ValueError(
                    f"stage.datamodule.mixture={mixture} has {len(mixture)} weights for {len(self.paths)} labels "
                    "files: give one per file of stage.datamodule.labels, in its order (or null)"
                )
            for weight in mixture:
                check_positive("stage.datamodule.mixture weight", weight, fix=" (a file's share of the draws)")
        self.mixture = mixture
        self.num_val, self.batch_size, self.num_workers, self.seed = num_val, batch_size, num_workers, seed
        self.pairs_per_sequence, self.pos_fraction = pairs_per_sequence, pos_fraction
        self.blob: dict | None = None

    @property
    def meta(self) -> dict:
        self._load()
        return self.blob["meta"]

    def _load(self):
        if self.blob is None:
            blobs = [load_labels(path) for path in self.paths]
            for path, blob in zip(self.paths[1:], blobs[1:]):
                for key in ("K", "model", "hidden_size", "vocab_size"):
                    if blob["meta"][key] != blobs[0]["meta"][key]:
                        raise ValueError(
                            f"{path} was made with {key}={blob['meta'][key]!r}, {self.paths[0]} with "
                            f"{blobs[0]['meta'][key]!r}: pool labels of one backbone and one K"
                        )
            self.blob = {key: [x for b in blobs for x in b[key]] for key in ("id", "ids", "topk", "mass", "h2o")}
            self.blob["source"] = [str(path) for path, b in zip(self.paths, blobs) for _ in b["ids"]]
            self.blob["meta"] = blobs[0]["meta"] | {"sources": [b["meta"].get("data") for b in blobs]}
            n = len(self.blob["ids"])
            if n < 2 or self.num_val >= n:
                raise ValueError(
                    f"{', '.join(map(str, self.paths))} hold {n} sequences: need more than "
                    f"stage.datamodule.num_val={self.num_val}"
                )

    def setup(self, stage: str | None = None):
        if hasattr(self, "train_set"):  # validate, then fit: the rows (and their residual streams) stay
            return
        self._load()
        keys = ("ids", "topk", "mass", "h2o", "source")
        rows = [dict(zip(keys, r)) for r in zip(*(self.blob[k] for k in keys))]
        # a seeded random hold-out: the labels file is ordered by length (longest first)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.val_set = [rows[k] for k in order[: self.num_val]]
        self.train_set = [rows[k] for k in order[self.num_val :]]

    def _collate(self, rows: list[dict], generator: torch.Generator | None) -> dict:
        K, B, T = self.meta["K"], len(rows), max(len(r["ids"]) for r in rows)
        batch = {"ids": torch.zeros(B, T, dtype=torch.long), "valid": torch.zeros(B, T, dtype=torch.bool)}
        pairs = [sample_pairs(r["topk"], self.pairs_per_sequence, self.pos_fraction, K, generator) for r in rows]
        P = max(1, max(len(p[0]) for p in pairs))
        batch.update(t=torch.zeros(B, P, dtype=torch.long), i=torch.zeros(B, P, dtype=torch.long))
        batch.update(y=torch.zeros(B, P), pair=torch.zeros(B, P, dtype=torch.bool))
        for row, (r, (t, i, y)) in enumerate(zip(rows, pairs)):
            n, p = len(r["ids"]), len(t)
            batch["ids"][row, :n] = r["ids"].long()
            batch["valid"][row, :n] = True
            batch["t"][row, :p], batch["i"][row, :p], batch["y"][row, :p] = t, i, y
            batch["pair"][row, :p] = True
        for key in ("topk", "mass", "h2o"):
            batch[key] = [r[key] for r in rows]
        if "x" in rows[0]:  # the backbone's residual stream (controller.input_layer > 0)
            batch["x"] = torch.zeros(B, T, rows[0]["x"].shape[-1])
            for row, r in enumerate(rows):
                batch["x"][row, : len(r["x"])] = r["x"].float()
        return batch

    def train_dataloader(self):
        sampler = None
        if self.mixture is not None:
            files = [str(path) for path in self.paths]
            counts = {source: sum(r["source"] == source for r in self.train_set) for source in files}
            share = {source: weight / max(counts[source], 1) for source, weight in zip(files, self.mixture)}
            weights = torch.tensor([share[r["source"]] for r in self.train_set], dtype=torch.double)
            sampler = WeightedRandomSampler(weights, num_samples=len(self.train_set), replacement=True)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_TrainCollate(self),
        )

    def val_dataloader(self):
        # the same validation pairs every time: one generator per loader, seeded
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.val_set, batch_size=self.batch_size, collate_fn=lambda rows: self._collate(rows, generator)
        )


class _TrainCollate:
    def __init__(self, datamodule: ControllerDataModule):
        self.datamodule = datamodule

    def __call__(self, rows):
        return self.datamodule._collate(rows, None)


def residual_key(model: ModelSpec, layer: int) -> dict:
    """What a residual stream depends on besides the tokens: the backbone (weights, adapter, dtype) and the layer."""
    key = {name: value for name, value in dataclasses.asdict(model).items() if name != "device"}
    if model.adapter:  # an adapter retrained in the same folder is another backbone
        weights = sorted(Path(model.adapter).glob("adapter_model.*"))
        key["adapter_stat"] = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]
    return key | {"layer": layer}


class ResidualCache:
    """The residual streams of one labels file's sequences at one layer, in `<labels>.residual_after_<layer>.pt`
    beside it, keyed by a hash of each sequence's tokens. A file made with another backbone is ignored (and
    replaced); one that cannot be written costs a warning, not the run."""

    FORMAT = 1

    def __init__(self, labels_file: str | Path, layer: int, key: dict):
        labels_file = Path(labels_file)
        self.path = labels_file.with_name(f"{labels_file.stem}.residual_after_{layer}.pt")
        self.key, self.streams, self.changed = key, {}, False
        if self.path.is_file():
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
            if blob.get("format") == self.FORMAT and blob.get("key") == key:
                self.streams = blob["streams"]

    @staticmethod
    def _digest(ids: torch.Tensor) -> str:
        return hashlib.sha1(ids.to(torch.int64).numpy().tobytes()).hexdigest()

    def get(self, ids: torch.Tensor) -> torch.Tensor | None:
        return self.streams.get(self._digest(ids))

    def put(self, ids: torch.Tensor, x: torch.Tensor) -> None:
        self.streams[self._digest(ids)] = x
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        try:
            save_torch(self.path, {"format": self.FORMAT, "key": self.key, "streams": self.streams})
        except OSError as error:
            warnings.warn(f"residual stream not cached at {self.path}: {error}", stacklevel=2)
        self.changed = False
