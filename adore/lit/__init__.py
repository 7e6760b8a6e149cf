"""Lightning wrappers of the training stages (the only place besides train.py that imports Lightning).

- `data.SequenceDataModule`: prompt + reference sequences (stages finetune, labels)
- `finetune.FinetuneModule`: LoRA under top-K sparse attention
- `labels.LabelsModule`: full-attention top-K labels (a predict pass)
- `controller_data.ControllerDataModule`, `controller.ControllerModule`: the controller (GRU scorer or probe)
- `pipeline`: every stage in order (`pipeline.py`); `label_builder`, `sparse_attention`: their pure-PyTorch parts
- `setup`: config checks at start, logger, labels location
"""
