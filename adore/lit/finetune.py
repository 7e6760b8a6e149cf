"""Stage `finetune` (ADORE.md §1): LoRA (QLoRA with `model.quantize=4bit`) under top-K sparse attention.

Training runs with top-K attention; validation reports the loss on the reference tokens under both top-K
(`val/loss_sparse`) and full attention (`val/loss_full`), so a run shows what sparse fine-tuning buys.
Checkpoints hold only the adapter weights (the frozen backbone is reloaded from `model`).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from adore.lit.sparse_attention import NAME as TOPK
from adore.lit.sparse_attention import enable_topk_attention
from adore.models import ModelSpec, load_model, load_tokenizer

FULL = "sdpa"


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float = 0.1):
    """LR multiplier: linear warm-up, then cosine decay to `floor` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class FinetuneModule(L.LightningModule):
    def __init__(
        self,
        model: ModelSpec,
        K: int = 64,
        lora: dict | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        gradient_checkpointing: bool = False,
        save_merged: bool = False,
    ):
        super().__init__()
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        self.spec, self.K, self.lr, self.weight_decay = model, K, lr, weight_decay
        self.warmup_steps, self.save_merged = warmup_steps, save_merged
        lora = dict(lora or {})
        backbone = load_model(model)
        if model.quantize is not None:  # QLoRA: fp32 norms and input grads for the 4-bit backbone
            backbone = prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=gradient_checkpointing)
        elif gradient_checkpointing:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        config = LoraConfig(
            r=lora.get("r", 16),
            lora_alpha=lora.get("alpha", 32),
            lora_dropout=lora.get("dropout", 0.05),
            target_modules=list(lora.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])),
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(backbone, config).train()  # load_model returns eval mode
        enable_topk_attention(self.model, K)
        self.val_loss = nn.ModuleDict({"sparse": MeanMetric(), "full": MeanMetric()})
        self.strict_loading = False  # checkpoints carry only the adapter
        self.save_hyperparameters(
            {"K": K, "lora": lora, "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps}
        )

    def loss(self, batch: dict, attention: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss on the reference tokens under `attention` ("topk" or "sdpa"), and their count."""
        self.model.set_attn_implementation(attention)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, (batch["labels"][:, 1:] != -100).sum()

    def training_step(self, batch, batch_idx):
        loss, _ = self.loss(batch, TOPK)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        for name, attention in (("sparse", TOPK), ("full", FULL)):
            loss, n = self.loss(batch, attention)
            self.val_loss[name].update(loss, n)
        self.model.set_attn_implementation(TOPK)

    def on_validation_epoch_end(self):
        for name, metric in self.val_loss.items():
            loss = metric.compute()
            self.log(f"val/loss_{name}", loss, prog_bar=name == "sparse")
            self.log(f"val/ppl_{name}", torch.exp(loss))
            metric.reset()

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else 10**9
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.warmup_steps, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def export(self, run_dir: str | Path) -> dict:
        """Write `adapter/` (load it with `model.adapter=<run_dir>/adapter`) and, if asked, `merged/`."""
        run_dir = Path(run_dir)
        self.model.set_attn_implementation(FULL)  # never save a config naming an unregistered attention
        self.model.save_pretrained(run_dir / "adapter")
        paths = {"adapter": str(run_dir / "adapter")}
        if self.save_merged:
            merged = self.model.merge_and_unload()
            merged.save_pretrained(run_dir / "merged")
            load_tokenizer(self.spec).save_pretrained(run_dir / "merged")
            paths["merged"] = str(run_dir / "merged")
        return paths
