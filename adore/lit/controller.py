"""Stage `controller` (ADORE.md §2): fit `adore.controller.Controller` to the labels of stage `labels`.

Loss (`loss`): `bce`, the paper's binary cross-entropy over sampled (t, i) pairs, i <= t, t >= K (earlier
queries keep every key, so there is nothing to learn there); or `listwise`, a ranking loss on the keep
decision: for sampled queries t, a softmax over all keys i <= t is fitted to the share of t's attention each
top-K key holds, so that the highest scores go where the most attention mass is. Validation, on held-out
sequences: precision and recall of each method's top-`budget` keys against the top-K labels, for the
controller, recency (window) and H2O.

`labels` may list several labels files (e.g. SAMSum, chat and math, from the same backbone): their sequences
are pooled. A controller reading a hidden layer (`controller.input_layer` > 0) gets the backbone's residual
stream, computed once per sequence at setup and cached beside each labels file (`residual_cache`), so that the
next controller reading the same layer of the same backbone skips the backbone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import Metric

from adore.controller import Controller, ControllerConfig
from adore.io import save_torch
from adore.lit.finetune import warmup_cosine
from adore.lit.label_builder import (
    dense_labels,
    h2o_scores,
    load_labels,
    recency_scores,
    sample_pairs,
    selection_counts,
)
from adore.models import ModelSpec, load_model, residual_after

METHODS = ("controller", "recency", "h2o")
LOSSES = ("bce", "listwise")


class ControllerDataModule(L.LightningDataModule):
    """Sequences of a labels file; `num_val` of them (seeded) are held out. Pairs are re-sampled every epoch."""

    def __init__(
        self,
        labels: str | list[str],
        num_val: int = 24,
        batch_size: int = 8,
        pairs_per_sequence: int = 256,
        pos_fraction: float = 0.5,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.paths = [labels] if isinstance(labels, str) else list(labels)
        if not self.paths:
            raise ValueError("stage.datamodule.labels is empty: give labels.pt files or labels run folders")
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
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=_TrainCollate(self),
        )

    def val_dataloader(self):
        # the same validation pairs every time: one generator per loader, seeded
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.val_set, batch_size=self.batch_size, collate_fn=lambda rows: self._collate(rows, generator)
        )


def attention_ahead(topk: torch.Tensor, mass: torch.Tensor, t: torch.Tensor, horizon: int) -> torch.Tensor:
    """(Q, T): for each query t, the share of attention each key i <= t gets from queries s in [t, t + horizon),
    from the labels' top-K shares (mass below a query's top-K counts as 0), normalised to sum 1 over i <= t.

    topk, mass: (T, K) one sequence's labels; t: (Q,) query positions."""
    T = topk.shape[0]
    index = topk.long()
    dense = torch.zeros(T, T + 1, device=topk.device)  # (queries, keys + a spare column for -1)
    dense.scatter_add_(1, index.masked_fill(index < 0, T), mass.float())
    ahead = torch.cat([dense.new_zeros(1, T + 1), dense.cumsum(0)])  # ahead[s] = sum of rows < s
    end = (t + horizon).clamp(max=T)
    target = (ahead[end] - ahead[t])[:, :T]  # (Q, T): rows t .. end-1
    target = target * (torch.arange(T, device=t.device)[None] <= t[:, None])  # keys that exist at t
    return target / target.sum(-1, keepdim=True).clamp(min=1e-9)


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


class _TrainCollate:
    def __init__(self, datamodule: ControllerDataModule):
        self.datamodule = datamodule

    def __call__(self, rows):
        return self.datamodule._collate(rows, None)


class TopKOverlap(Metric):
    """Micro-averaged precision (hits / selected) and recall (hits / positives) of top-budget selections."""

    def __init__(self):
        super().__init__()
        self.add_state("counts", default=torch.zeros(3), dist_reduce_fx="sum")  # hits, selected, positives

    def update(self, counts: torch.Tensor):
        self.counts += counts.to(self.counts)

    def compute(self):
        hits, selected, positives = self.counts
        return {"precision": hits / selected.clamp(min=1), "recall": hits / positives.clamp(min=1)}


class ControllerModule(L.LightningModule):
    def __init__(
        self,
        model: ModelSpec,
        controller: dict | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        budget: int | None = None,
        h2o_recent_ratio: float = 0.5,
        loss: str = "bce",
        queries_per_sequence: int = 64,
        recipe: str | None = None,
        horizon: int = 1,
        warmup_steps: int | None = None,
        residual_cache: bool = True,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"stage.module.loss={loss!r}: use one of {LOSSES}")
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"stage.module.horizon={horizon!r} must be an integer >= 1 (1: the current query only)")
        if horizon > 1 and loss != "listwise":
            raise ValueError(f"stage.module.horizon={horizon} needs stage.module.loss=listwise (its target is a mass)")
        if (controller or {}).get("heads") and loss != "listwise":
            raise ValueError(
                f"stage.module.loss={loss!r}: an attention probe (controller.heads > 0) outputs attention shares; "
                "train it with stage.module.loss=listwise"
            )
        backbone = load_model(model)
        embeddings = backbone.get_input_embeddings().weight.detach().float().clone()  # (vocab, d_model)
        self.register_buffer("embeddings", embeddings, persistent=False)  # frozen x_i; never in checkpoints
        self.controller = Controller(ControllerConfig(d_model=embeddings.shape[1], **(controller or {})))
        # the backbone is needed once, for the residual stream of every sequence (setup); never a submodule
        object.__setattr__(self, "backbone", backbone if self.controller.config.input_layer else None)
        self.lr, self.weight_decay = lr, weight_decay
        self.budget, self.h2o_recent_ratio = budget, h2o_recent_ratio
        self.loss_name, self.queries_per_sequence, self.recipe = loss, queries_per_sequence, recipe
        self.horizon, self.warmup_steps = horizon, warmup_steps
        self.residual_cache, self.model_spec = residual_cache, model
        self.overlap = nn.ModuleDict({name: TopKOverlap() for name in METHODS})
        self.save_hyperparameters(
            {
                "controller": controller,
                "lr": lr,
                "weight_decay": weight_decay,
                "budget": budget,
                "loss": loss,
                "horizon": horizon,
                "warmup_steps": warmup_steps,
            }
        )

    def setup(self, stage: str):
        meta = self.trainer.datamodule.meta
        self.K = meta["K"]
        self.budget = self.budget or self.K
        if meta["vocab_size"] != self.embeddings.shape[0] or meta["hidden_size"] != self.embeddings.shape[1]:
            raise ValueError(
                f"the labels were made with a model of vocab {meta['vocab_size']} and width {meta['hidden_size']}, "
                f"but `model` has {tuple(self.embeddings.shape)}: pass the labels run's model ({meta['model']['name_or_path']})"
            )
        if self.budget > meta["h2o_k"]:
            raise ValueError(
                f"stage.module.budget={self.budget} exceeds the H2O ranking length h2o_k={meta['h2o_k']} of the labels: "
                f"lower the budget or rerun `python train.py stage=labels stage.module.h2o_k={self.budget}`"
            )

        if self.controller.config.trained_distance is None:  # buckets past it stay untrained: capped at use
            longest = max(len(r["ids"]) for r in self.trainer.datamodule.train_set)
            self.controller.config.trained_distance = longest - 1
        if self.backbone is not None:
            self._residual_stream(self.trainer.datamodule)

    @torch.no_grad()
    def _residual_stream(self, datamodule, batch_size: int = 8) -> None:
        """x_i of every sequence: the backbone's residual stream after `input_layer` layers (once, float16),
        read from the cache beside each labels file where it was computed before."""
        from tqdm.auto import tqdm

        layer, device = self.controller.config.input_layer, self.backbone.device
        rows = [r for r in datamodule.train_set + datamodule.val_set if "x" not in r]
        caches = {}
        if self.residual_cache:
            key = residual_key(self.model_spec, layer)
            caches = {source: ResidualCache(source, layer, key) for source in dict.fromkeys(r["source"] for r in rows)}
            for r in rows:
                if (x := caches[r["source"]].get(r["ids"])) is not None:
                    r["x"] = x
            rows = [r for r in rows if "x" not in r]
        for s in tqdm(range(0, len(rows), batch_size), desc=f"residual stream after layer {layer}"):
            chunk = rows[s : s + batch_size]
            T = max(len(r["ids"]) for r in chunk)
            ids = torch.zeros(len(chunk), T, dtype=torch.long)
            mask = torch.zeros(len(chunk), T, dtype=torch.long)
            for j, r in enumerate(chunk):
                ids[j, : len(r["ids"])], mask[j, : len(r["ids"])] = r["ids"].long(), 1
            x = residual_after(self.backbone, layer, ids.to(device), mask.to(device)).float().cpu()
            for j, r in enumerate(chunk):
                r["x"] = x[j, : len(r["ids"])].half()  # (T, d_model)
                if r["source"] in caches:
                    caches[r["source"]].put(r["ids"], r["x"])
        for cache in caches.values():
            cache.save()
        object.__setattr__(self, "backbone", None)  # not needed any more

    def encode(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """z: (B, T, state width), one GRU pass over each sequence's x (input embeddings or residual stream), and
        the query state of every position t: z_t itself, or the probe's query from x_{t-1} and token t's embedding.
        """
        embeds = F.embedding(batch["ids"], self.embeddings)  # (B, T, d_model)
        x = batch["x"] if "x" in batch else embeds
        z = self.controller.encode(x, batch["valid"])[0]
        if not self.controller.config.heads:
            return z, z
        previous = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)  # x_{t-1} at t (zeros at t = 0)
        return z, self.controller.queries(previous, embeds)

    def pair_loss(self, batch, z, queries) -> torch.Tensor:
        gather = lambda v, index: v.gather(1, index[..., None].expand(-1, -1, v.shape[-1]))  # noqa: E731
        logits = self.controller.logits(gather(z, batch["i"]), batch["i"], batch["t"], gather(queries, batch["t"]))
        return F.binary_cross_entropy_with_logits(logits[batch["pair"]], batch["y"][batch["pair"]])

    def listwise_loss(self, batch, z, queries) -> torch.Tensor:
        """Cross-entropy between a softmax of the scores over keys i <= t and the attention shares they get from
        the queries s in [t, t + horizon) (horizon 1: t's own top-K shares): what a release at t will miss."""
        losses = []
        for row, (topk, mass) in enumerate(zip(batch["topk"], batch["mass"])):
            T = len(topk)
            if T <= self.K:
                continue
            t = torch.randperm(T - self.K, device=z.device)[: self.queries_per_sequence] + self.K  # (Q,)
            zr, pos = z[row, :T], torch.arange(T, device=z.device)
            logits = self.controller.logits(zr[None], pos[None], t[:, None], queries[row, t][:, None])  # (Q, T)
            logits = logits.masked_fill(pos[None] > t[:, None], float("-inf"))
            target = attention_ahead(topk.to(z.device), mass.to(z.device), t, self.horizon)  # (Q, T)
            losses.append(-(target * F.log_softmax(logits, -1).clamp(min=-1e4)).sum(-1).mean())
        return torch.stack(losses).mean() if losses else z.sum() * 0

    def loss(self, batch, z, queries) -> torch.Tensor:
        if self.loss_name == "bce":
            return self.pair_loss(batch, z, queries)
        return self.listwise_loss(batch, z, queries)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch, *self.encode(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["topk"]), sync_dist=True)
        return loss

    def scores(self, z: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """(T, T) controller logits of every key i (columns) for every query t (rows) of one sequence."""
        T = z.shape[0]
        pos = torch.arange(T, device=z.device)
        return self.controller.logits(z[None], pos[None, :], pos[:, None], queries[:, None])

    def validation_step(self, batch, batch_idx):
        z, queries = self.encode(batch)
        loss = self.loss(batch, z, queries)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["topk"]), sync_dist=True)
        for row, (topk, h2o) in enumerate(zip(batch["topk"], batch["h2o"])):
            T = len(topk)
            positive = dense_labels(topk.to(z.device), T)
            candidates = {
                "controller": self.scores(z[row, :T], queries[row, :T]),
                "recency": recency_scores(T, z.device),
                "h2o": h2o_scores(h2o.to(z.device), self.budget, self.h2o_recent_ratio),
            }
            for name, scores in candidates.items():
                self.overlap[name].update(selection_counts(scores, positive, self.budget, self.K))

    def on_validation_epoch_end(self):
        for name, metric in self.overlap.items():
            for key, value in metric.compute().items():
                self.log(f"val/{key}_{name}", value, prog_bar=name == "controller" and key == "recall")
            metric.reset()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.controller.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.warmup_steps is None:  # a constant learning rate (the recipes before the probe)
            return optimizer
        total = self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else 10**9
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.warmup_steps, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def export(self, run_dir: str | Path) -> dict:
        """Write `controller.pt` (`Controller.load` reads it; `method.controller=<run_dir>/controller.pt`)."""
        path = Path(run_dir) / "controller.pt"
        meta = self.trainer.datamodule.meta
        self.controller.cpu().save(
            path,
            meta={
                "K": self.K,
                "recipe": self.recipe,
                "loss": self.loss_name,
                "horizon": self.horizon,
                "backbone": meta["model"],
                "labels": [str(p) for p in self.trainer.datamodule.paths],
                "sources": meta.get("sources"),
            },
        )
        return {"controller": str(path)}
