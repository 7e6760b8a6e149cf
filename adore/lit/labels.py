"""Stage `labels` (ADORE.md §2): full-attention top-K labels for the controller, one file per run.

A `predict` pass: each batch runs the (optionally fine-tuned) LLM with eager full attention, its weights summed
over heads and layers as each layer computes them (`adore.models.summed_attention`: memory of one layer's
weights, so sequences of several thousand tokens fit); `adore.lit.label_builder` turns the sum into labels.
Runs on one device.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import torch

from adore.lit.label_builder import attention_labels, index_dtype, save_labels
from adore.models import ModelSpec, load_model, summed_attention


class LabelsModule(L.LightningModule):
    def __init__(self, model: ModelSpec, K: int = 64, h2o_k: int | None = None, max_length: int = 512):
        super().__init__()
        # None: 2 K, so that the controller stage's default budget (K) always fits the stored H2O ranking
        self.spec, self.K, self.h2o_k = model, K, 2 * K if h2o_k is None else h2o_k
        self.dtype_index = index_dtype(max_length)
        self.model = load_model(model)
        self.model.set_attn_implementation("eager")  # SDPA does not return attention weights
        self.model.requires_grad_(False)
        self.rows: list[dict] = []

    def predict_step(self, batch, batch_idx) -> int:
        valid = batch["attention_mask"].bool()
        with summed_attention(self.model) as totals:
            self.model.base_model(  # the decoder without the LM head: no logits needed
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            )
        topk, mass, h2o = attention_labels(totals[0], valid, self.K, self.h2o_k)
        for row, n in enumerate(valid.sum(1).tolist()):
            self.rows.append(
                {
                    "id": batch["id"][row],
                    "ids": batch["input_ids"][row, :n].to(torch.int32).cpu(),
                    "topk": topk[row, :n].to(self.dtype_index).cpu(),  # (T, K)
                    "mass": mass[row, :n].half().cpu(),  # (T, K)
                    "h2o": h2o[row, :n].to(self.dtype_index).cpu(),  # (T, h2o_k)
                }
            )
        return len(valid)

    def export(self, run_dir: str | Path) -> dict:
        """Write `labels/labels.pt` (see `adore.lit.label_builder.save_labels`)."""
        meta = {
            "K": self.K,
            "h2o_k": self.h2o_k,
            "model": dataclasses.asdict(self.spec),
            "data": getattr(getattr(self.trainer.datamodule, "data", None), "name", None),
            "hidden_size": self.model.config.hidden_size,
            "vocab_size": self.model.get_input_embeddings().num_embeddings,
            "num_sequences": len(self.rows),
            "num_tokens": sum(len(r["ids"]) for r in self.rows),
        }
        path = save_labels(Path(run_dir) / "labels" / "labels.pt", meta, self.rows)
        return {"labels": str(path), "labels/num_sequences": len(self.rows), "labels/num_tokens": meta["num_tokens"]}
