"""Stage `controller` (ADORE.md §2): fit `adore.controller.Controller` to the labels of stage `labels`.

Loss (`loss`): `bce`, the paper's binary cross-entropy over sampled (t, i) pairs, i <= t, t >= K (earlier
queries keep every key, so there is nothing to learn there); or `listwise`, a ranking loss on the keep
decision: for sampled queries t, a softmax over all keys i <= t is fitted to the share of t's attention each
top-K key holds, so that the highest scores go where the most attention mass is. Validation, on held-out
sequences: precision and recall of each method's top-`budget` keys against the top-K labels, for the
controller, recency (window) and H2O.

The data (`ControllerDataModule`: labels files pooled, pairs sampled) is in `controller_data.py`. A controller
reading a hidden layer (`controller.input_layer` > 0) gets the backbone's residual stream, computed once per
sequence at setup and cached beside each labels file (`residual_cache`), so that the next controller reading the
same layer of the same backbone skips the backbone.

`init_from` continues a trained controller (e.g. the shipped one on longer labels) instead of a fresh one: the
checkpoint must be of the architecture the recipe names, and its `trained_distance` only grows.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from adore.checks import check_integer
from adore.controller import Controller, ControllerConfig, continuable
from adore.engine.text import batches_by_length
from adore.lit.controller_data import ControllerDataModule, ResidualCache, residual_key
from adore.lit.finetune import warmup_cosine
from adore.lit.label_builder import dense_labels, h2o_scores, recency_scores, selection_counts
from adore.models import ModelSpec, load_model, residual_after

# conf/stage/controller.yaml names its datamodule here too: adore.lit.controller.ControllerDataModule
__all__ = ["ControllerDataModule", "ControllerModule", "attention_ahead"]

METHODS = ("controller", "recency", "h2o")
LOSSES = ("bce", "listwise")


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
    """The controller (`controller`: ControllerConfig fields) fitted by `loss`; x_i read from the backbone's frozen
    input embeddings, or its residual stream after `input_layer` layers (computed at setup, then dropped)."""

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
        init_from: str | None = None,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"stage.module.loss={loss!r}: use one of {LOSSES}")
        check_integer("stage.module.horizon", horizon, fix=" (1: the current query only)")
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
        config = ControllerConfig(d_model=embeddings.shape[1], **(controller or {}))
        self.init_from = init_from and continuable(init_from, asdict(config), "stage.module.init_from")
        self.controller = Controller.load(self.init_from).train() if init_from else Controller(config)
        # the longest distance trained: from these labels, unless given; a continued controller's only grows
        self.extend_trained_distance = bool(init_from) or config.trained_distance is None
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
                "init_from": init_from,
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

        if self.extend_trained_distance:  # buckets past it stay untrained: capped at use
            longest = max(len(r["ids"]) for r in self.trainer.datamodule.train_set)
            self.controller.extend_trained_distance(longest - 1)
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
        # similar lengths share a forward: a pooled order would pad every batch to the longest sequence
        for batch in tqdm(
            batches_by_length([len(r["ids"]) for r in rows], batch_size), desc=f"residual stream after layer {layer}"
        ):
            chunk = [rows[k] for k in batch]
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
        """z: (B, T, state width), one pass over each sequence's x (input embeddings or residual stream), and the
        query of every position t (`Controller.sequence_queries`)."""
        embeds = F.embedding(batch["ids"], self.embeddings)  # (B, T, d_model)
        x = batch["x"] if "x" in batch else embeds
        z = self.controller.encode(x, batch["valid"])[0]
        return z, self.controller.sequence_queries(x, embeds, z)

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
                "init_from": self.init_from,
            },
        )
        return {"controller": str(path)}
