"""Is on-policy training worth it? The feature shift between full attention and the bounded loop (issue 12).

The controller is trained on features computed under full attention (the residual stream after
`input_layer` layers of every labels sequence), but in the bounded loop each token's features come from a
forward over at most m + R + 1 cached tokens. On-policy rollouts would train on the loop's own features. This
measures how far apart the two are, and what the shift costs the controller offline, before anyone pays for
rollouts: WikiText-2 train windows (never evaluated) are teacher-forced through the loop one token per step, as
`task=perplexity` feeds them, and the controller's top-m recall of full attention's top-K labels is computed
with each set of features.

    python notebooks/rollout_shift.py [--m 64] [--windows 8] [--controller checkpoints/...pt]

Prints, per feature source: cosine similarity to the full-attention features (mean, 10th percentile) and the
controller's top-`m` recall of the top-K labels over queries t >= K (its held-out validation metric).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))  # run as a script from anywhere: the package is the project's own

from adore.controller import Controller  # noqa: E402
from adore.engine.generate import teacher_force  # noqa: E402
from adore.lit.label_builder import attention_labels, dense_labels, selection_counts  # noqa: E402
from adore.methods import Adore  # noqa: E402
from adore.models import residual_after  # noqa: E402


def loop_features(model, method, ids: torch.Tensor, valid: torch.Tensor, width: int) -> torch.Tensor:
    """(B, T, width): the residual stream each token had when it entered `method`'s bounded loop."""
    features = torch.zeros(*ids.shape, width)
    update = method.update

    def record(state, entered):
        for row in range(ids.shape[0]):
            ok = entered.valid[row]
            features[row, entered.positions[row][ok]] = entered.hidden[row][ok].float().cpu()
        update(state, entered)

    method.update = record
    rows = [ids[row, : int(valid[row].sum())].tolist() for row in range(ids.shape[0])]
    teacher_force(model, method, [r[:1] for r in rows], [r[1:] for r in rows], 0, lambda *_: None)
    method.update = update
    return features


@torch.no_grad()
def recall(net: Controller, embed, features, ids, valid, topk, budget: int, K: int) -> float:
    """The controller's top-`budget` recall of the top-K labels, every query t >= K, features as given."""
    counts = torch.zeros(3)
    for row in range(ids.shape[0]):
        T = int(valid[row].sum())
        x = features[row : row + 1, :T]
        z = net.encode(x, torch.ones(1, T, dtype=torch.bool))[0][0]
        previous = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
        query = net.queries(previous, embed(ids[row : row + 1, :T]).float())[0]
        pos = torch.arange(T)
        scores = net.logits(z[None], pos[None, :], pos[:, None], query[:, None])
        counts += selection_counts(scores, dense_labels(topk[row, :T], T), budget, K)
    return float(counts[0] / counts[2])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=64, help="the loop's cache size (and the recall budget)")
    parser.add_argument("--R", type=int, default=4)
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 train windows of 512 tokens")
    parser.add_argument("--controller", default="checkpoints/controller_smollm2_probe_k64.pt")
    args = parser.parse_args()
    controller = str(PROJECT / args.controller) if not Path(args.controller).is_file() else args.controller
    net = Controller.load(controller)
    if not net.config.heads or not net.config.input_layer:
        raise SystemExit(f"{controller}: this measures an attention probe that reads a residual stream")
    K = Controller.meta(controller)["K"]
    with initialize_config_dir(str(PROJECT / "conf"), version_base=None):
        cfg = compose(
            "train",
            overrides=[
                "stage=labels",
                "data=wikitext2",
                "data.split=train",
                f"K={K}",
                "stage.datamodule.max_length=512",
                f"stage.datamodule.num_train={args.windows}",
                f"stage.datamodule.batch_size={args.windows}",
            ],
        )
    datamodule = instantiate(cfg.stage.datamodule)
    datamodule.setup("predict")
    model = instantiate(cfg.stage.module).model  # eager attention: the labels' own weights
    batch = next(iter(datamodule.predict_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    valid = mask.bool()
    with torch.no_grad():
        attentions = model.base_model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        topk = attention_labels(attentions, valid, K, K)[0]
        del attentions
        model.set_attn_implementation("sdpa")
        full = residual_after(model, net.config.input_layer, ids, mask).float()
    start = time.perf_counter()
    method = Adore(m=args.m, R=args.R, controller=controller, rebuild_every=1)
    loop = loop_features(model, method, ids, valid, full.shape[-1])
    print(f"{len(ids)} windows, {int(valid.sum())} tokens; rollout {method.tag}: {time.perf_counter() - start:.0f} s")
    embed = model.get_input_embeddings()
    for name, features in (("full attention", full), (f"bounded loop, m = {args.m}", loop)):
        cos = torch.nn.functional.cosine_similarity(features[valid], full[valid], -1)
        print(
            f"{name:>24}: cosine to full mean {cos.mean():.4f}, p10 {cos.quantile(0.1):.4f}; "
            f"top-{args.m} recall {recall(net, embed, features, ids, valid, topk, args.m, K):.4f}"
        )


if __name__ == "__main__":
    main()
