"""Lightning's ModelCheckpoint, saving once more when training stops between two periodic saves."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint


class ModelCheckpoint(_ModelCheckpoint):
    """With `every_n_train_steps`, Lightning's callback keeps the last *periodic* checkpoint when `max_steps`
    stops a run in between; this one also saves the final step, so `train.resume=true` continues from there.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
