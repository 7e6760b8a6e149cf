"""Lightning wrappers of the training stages (the only place besides train.py that imports Lightning).

- `data.SequenceDataModule`: prompt + reference sequences (stages finetune, labels)
- `finetune.FinetuneModule`: LoRA under top-K sparse attention
- `labels.LabelsModule`: full-attention top-K labels (a predict pass)
- `controller.ControllerDataModule`, `controller.ControllerModule`: the GRU controller
- `setup`: config checks at start, logger, labels location
"""
