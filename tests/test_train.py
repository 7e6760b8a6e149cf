"""The training stages on the tiny random Llama: the real Hydra config, composed and shrunk."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROJECT, compose

from adore.controller import Controller, bucketize
from adore.lit.label_builder import (
    dense_labels,
    h2o_scores,
    load_labels,
    ranked_keys,
    recency_scores,
    sample_pairs,
    selection_counts,
)
from adore.lit.setup import check_config
from adore.models import ModelSpec, load_model
from train import train

CONF = Path(__file__).resolve().parents[1] / "conf"
K = 8


def make_cfg(stage: str, run_dir: Path, *overrides: str, model_dir: str | None = None):
    """The shipped config of `stage`, shrunk: tiny model, few short sequences, CSV logging, one thread."""
    base = [f"stage={stage}", f"run_dir={run_dir}", "logger.mode=disabled", f"K={K}", "train.threads=1"]
    if model_dir is not None:
        base.append(f"model.name_or_path={model_dir}")
    if stage in ("finetune", "labels"):
        base += ["stage.datamodule.num_train=8", "stage.datamodule.max_length=256", "stage.datamodule.batch_size=2"]
    if stage == "finetune":
        base += ["stage.datamodule.num_val=2", "stage.module.lora.r=4"]
    if stage == "labels":
        base += ["stage.module.h2o_k=16"]
    if stage == "controller":
        base += [
            "stage.datamodule.num_val=2",
            "stage.datamodule.batch_size=2",
            "stage.datamodule.pairs_per_sequence=64",
        ]
    return compose("train", *base, *overrides)


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def labels_run(tmp_path_factory, tiny_model_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("labels_run")
    train(make_cfg("labels", run_dir, "debug=fdr", "stage.datamodule.batch_size=4", model_dir=tiny_model_dir))
    return run_dir


# --- the pure parts (adore.lit.label_builder) ---


def test_ranked_keys_are_causal_best_first_and_padded():
    scores = torch.tensor([[[1.0, 9, 9], [2, 5, 9], [3, 1, 2]]])  # (1, T=3, T): upper triangle must be ignored
    index = ranked_keys(scores, torch.ones(1, 3, dtype=torch.bool), k=2)
    assert index[0].tolist() == [[0, -1], [1, 0], [0, 2]]
    assert dense_labels(index[0], 3).tolist() == [[True, False, False], [True, True, False], [True, False, True]]


def test_sample_pairs_respects_causality_min_query_and_balance():
    T = 40
    topk = ranked_keys(torch.rand(1, T, T), torch.ones(1, T, dtype=torch.bool), K)[0]
    t, i, y = sample_pairs(topk, 200, 0.25, K, torch.Generator().manual_seed(0))
    assert len(t) == 200 and (i <= t).all() and (t >= K).all()
    assert y.sum() == 50
    positive = dense_labels(topk, T)
    assert torch.equal(positive[t, i].float(), y)
    assert len(sample_pairs(topk[:K], 10, 0.5, K)[0]) == 0  # no query t >= K: nothing to learn


def test_selections_recency_and_h2o():
    T, budget = 12, 4
    positive = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        positive[t, max(0, t - budget + 1) : t + 1] = True  # the labels are exactly the recent window
    assert selection_counts(recency_scores(T), positive, budget, budget)[0] == budget * (T - budget)
    # H2O, half recent: the last 2 keys, then the two best of the ranking that are not recent
    ranking = torch.arange(T).expand(T, T).clone()  # key 0 best, then 1, ...
    ranking = ranking.masked_fill(ranking > torch.arange(T)[:, None], -1)
    scores = h2o_scores(ranking, budget, 0.5)
    chosen = scores[T - 1].topk(budget).indices.sort().values.tolist()
    assert chosen == [0, 1, T - 2, T - 1]
    hits, selected, positives = selection_counts(scores, positive, budget, budget)
    assert selected == positives == budget * (T - budget)
    assert hits == 2 * (T - budget) + 1  # the two recent keys, plus heavy hitter 1 while it is still recent-ish (t=4)


# --- the stages ---


def test_finetune_fast_dev_run_writes_a_loadable_adapter(tmp_path, tiny_model_dir):
    metrics, objects = train(make_cfg("finetune", tmp_path, "debug=fdr", model_dir=tiny_model_dir))
    for key in ("val/loss_sparse", "val/ppl_sparse", "val/loss_full", "val/ppl_full", "before/val/loss_sparse"):
        assert key in metrics
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "metrics.json").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    tuned = load_model(ModelSpec(name_or_path=tiny_model_dir, adapter=str(tmp_path / "adapter")))
    ids = torch.tensor([[1, 2, 3, 4]])
    peft_model = objects["module"].model  # the trained PEFT model, adapter not merged
    peft_model.set_attn_implementation("sdpa")
    with torch.no_grad():
        torch.testing.assert_close(tuned(ids).logits, peft_model.eval()(ids).logits, atol=1e-4, rtol=1e-4)


def test_ruler_training_sequences_fit_their_length_and_answer_with_every_reference(tmp_path, tiny_model_dir):
    """`stage.datamodule.ruler`: seeded RULER examples as sequences, each within its length, the reply holding every
    reference hidden in its context; another seed than the evaluation's gives other prompts."""
    from adore.data import DataSpec
    from adore.lit.data import SequenceDataModule

    def sequences(seed):
        ruler = {"variants": ["niah_single", "vt"], "lengths": [300, 400], "num_examples": 2, "seed": seed}
        data = SequenceDataModule(
            DataSpec(name="noise"), ModelSpec(name_or_path=tiny_model_dir), max_length=400, ruler=ruler
        )
        data.setup()
        return data

    data = sequences(1)
    assert [e["id"] for e in data.train_set][:2] == ["niah_single-300-0-seed1", "niah_single-300-1-seed1"]
    assert len(data.train_set) == 8
    for e in data.train_set:
        length = int(e["id"].split("-")[1])
        assert len(e["input_ids"]) <= length and len(e["input_ids"]) > length - 40
        prompt = data.tokenizer.decode([t for t, y in zip(e["input_ids"], e["labels"]) if y == -100])
        reply = data.tokenizer.decode([t for t, y in zip(e["input_ids"], e["labels"]) if y != -100])
        answers = reply.split(" is " if "niah" in e["id"] else ":")[-1].split("<")[0].strip(" .").split(", ")
        assert answers and all(a and a in prompt for a in answers)  # every reference was hidden in the context
    assert [e["input_ids"] for e in sequences(1).train_set] == [e["input_ids"] for e in data.train_set]
    assert all(a["input_ids"] != b["input_ids"] for a, b in zip(sequences(0).train_set, data.train_set))
    with pytest.raises(ValueError, match=r"ruler.lengths=\[200, 300\] reach past stage.datamodule.max_length=256"):
        SequenceDataModule(
            DataSpec(name="noise"),
            None,
            max_length=256,
            ruler={"variants": ["vt"], "lengths": [200, 300], "num_examples": 1, "seed": 1},
        )
    with pytest.raises(ValueError, match="ruler.variants=\\['niah'\\]"):
        SequenceDataModule(
            DataSpec(name="noise"), None, ruler={"variants": ["niah"], "lengths": [200], "num_examples": 1, "seed": 1}
        )


def test_labels_fast_dev_run_writes_top_k_indices(labels_run):
    blob = load_labels(labels_run / "labels" / "labels.pt")
    assert blob["meta"]["K"] == K and blob["meta"]["num_sequences"] == len(blob["ids"]) == 4
    for ids, topk, h2o in zip(blob["ids"], blob["topk"], blob["h2o"]):
        T = len(ids)
        assert topk.shape == (T, K) and h2o.shape == (T, 16) and topk.dtype == torch.int16
        t = torch.arange(T)[:, None]
        assert ((topk <= t) & (topk >= -1)).all()
        assert ((topk >= 0).sum(1) == (t[:, 0] + 1).clamp(max=K)).all()  # t < K: every key i <= t is a positive


def test_controller_fast_dev_run_and_checkpoint_round_trip(tmp_path, tiny_model_dir, labels_run):
    cfg = make_cfg(
        "controller", tmp_path, "debug=fdr", f"stage.datamodule.labels={labels_run}", model_dir=tiny_model_dir
    )
    metrics, objects = train(cfg)
    for method in ("controller", "recency", "h2o"):
        assert 0 <= metrics[f"val/recall_{method}"] <= 1 and 0 <= metrics[f"val/precision_{method}"] <= 1
    loaded = Controller.load(tmp_path / "controller.pt")
    longest = max(len(r["ids"]) for r in objects["datamodule"].train_set)
    assert loaded.config.trained_distance == longest - 1  # buckets past the training data are capped at use
    trained = objects["module"].controller.eval()
    embeds, valid = torch.randn(2, 9, loaded.config.d_model), torch.ones(2, 9, dtype=torch.bool)
    with torch.no_grad():
        z_a, z_b = loaded.encode(embeds, valid)[0], trained.encode(embeds, valid)[0]
        pos = torch.arange(9)
        torch.testing.assert_close(loaded.logits(z_a, pos, torch.tensor(8)), trained.logits(z_b, pos, torch.tensor(8)))


def test_a_controller_trained_further_starts_from_its_checkpoint(tmp_path, tiny_model_dir, labels_run):
    """`stage.module.init_from` continues a checkpoint: before training it scores as the checkpoint did, the
    trained distance only grows, the meta names it; another architecture is refused before training."""
    labels = f"stage.datamodule.labels={labels_run}"
    first, _ = train(make_cfg("controller", tmp_path / "first", "debug=fdr", labels, model_dir=tiny_model_dir))
    saved = tmp_path / "first" / "controller.pt"
    then, objects = train(
        make_cfg(
            "controller",
            tmp_path / "then",
            "debug=fdr",
            labels,
            f"stage.module.init_from={saved}",
            model_dir=tiny_model_dir,
        )
    )
    assert then["before/val/recall_controller"] == pytest.approx(first["val/recall_controller"])
    assert Controller.meta(tmp_path / "then" / "controller.pt")["init_from"] == str(saved)
    short = Controller.load(saved)
    short.config.trained_distance = 2  # as if trained on shorter sequences
    short.save(tmp_path / "short.pt", meta=Controller.meta(saved))
    train(
        make_cfg(
            "controller",
            tmp_path / "longer",
            "debug=fdr",
            labels,
            f"stage.module.init_from={tmp_path / 'short.pt'}",
            model_dir=tiny_model_dir,
        )
    )
    longest = max(len(r["ids"]) for r in objects["datamodule"].train_set)
    assert Controller.load(tmp_path / "longer" / "controller.pt").config.trained_distance == longest - 1
    other = ("debug=fdr", labels, f"stage.module.init_from={saved}", "stage.module.controller.width=8")
    with pytest.raises(ValueError, match="init_from=.*width=64, but the recipe asks for 8"):
        train(make_cfg("controller", tmp_path / "other", *other, model_dir=tiny_model_dir))
    with pytest.raises(ValueError, match="init_from='missing.pt' does not exist"):
        train(
            make_cfg(
                "controller", tmp_path / "none", labels, "stage.module.init_from=missing.pt", model_dir=tiny_model_dir
            )
        )


def test_a_mixture_sets_each_labels_files_share_of_the_draws(tmp_path, labels_run):
    """`stage.datamodule.mixture`: draws follow the files' weights, whatever their sizes; a wrong length is refused."""
    import shutil

    from adore.lit.controller_data import ControllerDataModule

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for path in (a, b):
        shutil.copy(labels_run / "labels" / "labels.pt", path)
    data = ControllerDataModule([str(a), str(b)], num_val=1, batch_size=2, mixture=[9, 1], seed=0)
    data.setup()
    torch.manual_seed(0)
    drawn = [data.train_set[k]["source"] for _ in range(300) for k in data.train_dataloader().sampler]
    assert drawn.count(str(a)) / len(drawn) == pytest.approx(0.9, abs=0.03)
    assert len(drawn) == 300 * len(data.train_set)  # an epoch is still one draw per training sequence
    with pytest.raises(ValueError, match=r"mixture=\[1\] has 1 weights for 2 labels files"):
        ControllerDataModule([str(a), str(b)], mixture=[1])
    with pytest.raises(ValueError, match="mixture weight=0 must be a number > 0"):
        ControllerDataModule([str(a), str(b)], mixture=[1, 0])


RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_controller_recipe_trains_and_round_trips(recipe, tmp_path, tiny_model_dir, labels_run):
    """Every lever (conf/recipe) trains a step; its checkpoint records the recipe and scores as trained."""
    overrides = [f"recipe={recipe}", f"stage.datamodule.labels=[{labels_run},{labels_run}]"]  # two files, pooled
    text = (CONF / "recipe" / f"{recipe}.yaml").read_text()
    if "input_layer" in text or "init_from" in text:
        overrides.append("stage.module.controller.input_layer=1")  # the tiny model has 2 layers
    if "init_from" in text:  # a recipe that trains a checkpoint further: its base recipe, trained on the tiny model
        base = [o.replace(recipe, "probe_l20") for o in overrides]
        train(make_cfg("controller", tmp_path / "base", "debug=fdr", *base, model_dir=tiny_model_dir))
        overrides.append(f"stage.module.init_from={tmp_path / 'base' / 'controller.pt'}")
    cfg = make_cfg("controller", tmp_path, "debug=fdr", *overrides, model_dir=tiny_model_dir)
    metrics, objects = train(cfg)
    assert np.isfinite(metrics["val/loss"])
    loaded = Controller.load(tmp_path / "controller.pt")
    assert Controller.meta(tmp_path / "controller.pt")["recipe"] == recipe
    trained = objects["module"].controller.eval()
    x, valid = torch.randn(2, 9, loaded.config.d_model), torch.ones(2, 9, dtype=torch.bool)
    with torch.no_grad():
        a, b = score_last_query(loaded, x, valid), score_last_query(trained, x, valid)
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a).all()


def test_residual_stream_is_cached_beside_the_labels_and_reused(tmp_path, tiny_model_dir, labels_run, monkeypatch):
    """A second controller reading the same layer of the same backbone skips the backbone and sees the same x."""
    import shutil

    import adore.lit.controller as stage

    labels = tmp_path / "labels.pt"
    shutil.copy(labels_run / "labels" / "labels.pt", labels)
    overrides = ["recipe=probe", f"stage.datamodule.labels={labels}", "stage.module.controller.input_layer=1"]
    first = train(make_cfg("controller", tmp_path / "a", "debug=fdr", *overrides, model_dir=tiny_model_dir))[1]
    cache = tmp_path / "labels.residual_after_1.pt"
    assert cache.is_file()

    def no_backbone(*args, **kwargs):
        raise AssertionError("the residual stream was recomputed, not read from the cache")

    monkeypatch.setattr(stage, "residual_after", no_backbone)
    second = train(make_cfg("controller", tmp_path / "b", "debug=fdr", *overrides, model_dir=tiny_model_dir))[1]
    rows = lambda objects: objects["datamodule"].train_set + objects["datamodule"].val_set  # noqa: E731
    for a, b in zip(rows(first), rows(second)):
        assert torch.equal(a["x"], b["x"])
    # another layer is another file; another backbone does not read this one
    key = stage.residual_key(ModelSpec(name_or_path=str(tiny_model_dir)), 1)
    assert (
        stage.ResidualCache(labels, 1, key).streams and not stage.ResidualCache(labels, 1, key | {"dtype": "x"}).streams
    )
    assert not stage.ResidualCache(labels, 2, key | {"layer": 2}).streams


def score_last_query(net: Controller, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Scores of every token for the last position as the query, whatever the controller's kind."""
    z = net.encode(x, valid)[0]
    query = net.queries(x[:, -2], x[:, -1])[:, None] if net.config.heads else z[:, -1:]
    return net.logits(z, torch.arange(x.shape[1]), torch.tensor(x.shape[1] - 1), query)


def test_attention_ahead_sums_the_next_queries_shares():
    from adore.lit.controller import attention_ahead

    topk = torch.tensor([[0, -1], [1, 0], [2, 1]])  # (T=3, K=2) keys of each query, best first
    mass = torch.tensor([[1.0, 0.0], [0.6, 0.4], [0.7, 0.3]])
    one = attention_ahead(topk, mass, torch.tensor([1, 2]), 1)
    torch.testing.assert_close(one, torch.tensor([[0.4, 0.6, 0.0], [0.0, 0.3, 0.7]]))  # the query's own shares
    two = attention_ahead(topk, mass, torch.tensor([0, 1]), 2)
    # t=0: queries 0, 1 give key 0 mass 1.0 + 0.4 (key 1 does not exist yet at t=0); t=1: queries 1, 2
    torch.testing.assert_close(two, torch.tensor([[1.0, 0.0, 0.0], [0.4 / 1.3, 0.9 / 1.3, 0.0]]))


def test_recipe_outside_the_controller_stage_is_refused(tmp_path):
    with pytest.raises(ValueError, match="recipe=query is a controller recipe"):
        check_config(make_cfg("finetune", tmp_path, "recipe=query"))


def test_shipped_paper_controller_loads_and_scores_as_before():
    """The checkpoint shipped before the levers existed loads as the paper's controller, with the same scores."""
    path = Path(__file__).resolve().parents[1] / "checkpoints" / "controller_smollm2_samsum_k64.pt"
    loaded = Controller.load(path)
    assert not loaded.config.query and loaded.config.input_layer == 0
    blob = torch.load(path, weights_only=True)
    torch.manual_seed(0)
    x, valid = torch.randn(1, 12, loaded.config.d_model), torch.ones(1, 12, dtype=torch.bool)
    with torch.no_grad():
        z = loaded.encode(x, valid)[0]
        got = loaded.logits(z, torch.arange(12), torch.tensor(11))
        # the paper's formula, by hand from the stored weights: MLP(p + z)
        sd = blob["state_dict"]
        p = sd["position.weight"][
            bucketize(11 - torch.arange(12), loaded.config.num_buckets, loaded.config.max_distance)
        ]
        h = torch.nn.functional.gelu((p + z) @ sd["mlp.0.weight"].T + sd["mlp.0.bias"])
        want = (h @ sd["mlp.2.weight"].T + sd["mlp.2.bias"]).squeeze(-1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("recipe,layer", [("probe_deep", 12), ("probe_l16", 16), ("probe_l20", 20)])
def test_committed_deep_probes_read_the_documented_layer(recipe, layer):
    """checkpoints/controller_smollm2_<recipe>_k64.pt is that recipe as documented (docs/training.md)."""
    path = Path(__file__).resolve().parents[1] / "checkpoints" / f"controller_smollm2_{recipe}_k64.pt"
    net, meta = Controller.load(path), Controller.meta(path)
    assert (meta["recipe"], meta["K"], meta["loss"]) == (recipe, 64, "listwise")
    assert (net.config.input_layer, net.config.heads, net.config.trained_distance) == (layer, 8, 511)
    x, valid = torch.randn(1, 9, net.config.d_model), torch.ones(1, 9, dtype=torch.bool)
    with torch.no_grad():
        scores = score_last_query(net, x, valid)
    assert torch.isfinite(scores).all() and torch.allclose(scores.exp().sum(), torch.tensor(1.0), atol=1e-4)


def test_committed_long_controller_continues_the_shipped_one_to_4k_distances():
    """checkpoints/controller_smollm2_probe_l20_long_k64.pt is probe_l20 trained further, every distance to 4,095."""
    path = Path(__file__).resolve().parents[1] / "checkpoints" / "controller_smollm2_probe_l20_long_k64.pt"
    net, meta = Controller.load(path), Controller.meta(path)
    assert (meta["recipe"], meta["K"], meta["init_from"]) == (
        "probe_l20_long",
        64,
        "checkpoints/controller_smollm2_probe_l20_k64.pt",
    )
    assert (net.config.input_layer, net.config.heads, net.config.trained_distance) == (20, 8, 4095)
    shipped = Controller.load(path.with_name("controller_smollm2_probe_l20_k64.pt"))
    assert not torch.equal(net.head_bias.weight, shipped.head_bias.weight)  # trained further, not a copy


def test_overfit_a_few_batches_lowers_the_loss(tmp_path, tiny_model_dir):
    overrides = (
        "debug=overfit",
        "trainer.max_steps=16",
        "trainer.check_val_every_n_epoch=8",
        "stage.validate_before=false",
        "stage.module.lr=1e-2",
        "stage.module.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
    )
    train(make_cfg("finetune", tmp_path, *overrides, model_dir=tiny_model_dir))
    import csv

    with open(tmp_path / "csv" / "metrics.csv") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1


def test_resume_continues_from_the_saved_step(tmp_path, tiny_model_dir):
    # 3 steps with a periodic save every 2: the final step must still be saved, and resumed from
    common = ("trainer.callbacks.0.every_n_train_steps=2", "stage.validate_after=false", "trainer.log_every_n_steps=1")
    first, _ = train(make_cfg("finetune", tmp_path, "trainer.max_steps=3", *common, model_dir=tiny_model_dir))
    assert first["trainer/global_step"] == 3
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3 and all("lora_" in k for k in checkpoint["state_dict"])  # adapter only
    cfg = make_cfg("finetune", tmp_path, "trainer.max_steps=5", "train.resume=true", *common, model_dir=tiny_model_dir)
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run: pass train.resume=true"):
        train(make_cfg("finetune", tmp_path, "trainer.max_steps=5", *common, model_dir=tiny_model_dir))
    resumed, _ = train(cfg)
    assert resumed["trainer/global_step"] == 5 and "before/val/loss_sparse" not in resumed
    with open(tmp_path / "csv" / "metrics.csv") as f:  # the history of steps 0-2 survives the resume
        steps = [int(float(row["step"])) for row in csv.DictReader(f) if row.get("train/loss")]
    assert steps[:3] == [0, 1, 2] and len(steps) == 5 and steps == sorted(steps)  # 3 steps before, 2 after


@pytest.mark.parametrize(
    "stage, override, message",
    [
        ("finetune", "K=0", "K=0"),
        ("finetune", "stage.module.lora.r=0", "lora.r=0"),
        ("finetune", "trainer.precision=16-mixed", "trainer.precision='16-mixed' needs CUDA"),
        ("finetune", "trainer.accelerator=gpu", "trainer.accelerator='gpu'"),
        ("finetune", "model.device=cuda", "model.device='cuda'"),
        ("finetune", "model.quantize=4bit", "QLoRA"),
        ("finetune", "train.resume=true", "last.ckpt does not exist"),
        ("labels", "model.adapter=/nowhere", "model.adapter='/nowhere'"),
        ("controller", "stage.datamodule.labels=/nowhere/labels.pt", "python train.py stage=labels"),
        ("finetune", "stage.name=typo", "stage.name='typo'"),
        ("finetune", "stage.datamodule.batch_size=0", "stage.datamodule.batch_size=0 must be a positive integer"),
        ("controller", "stage.datamodule.num_val=-1", "stage.datamodule.num_val=-1"),
    ],
)
def test_bad_configs_fail_at_start(tmp_path, monkeypatch, stage, override, message):
    if torch.cuda.is_available() and any(s in override for s in ("16-mixed", "gpu", "cuda", "4bit")):
        pytest.skip("valid where CUDA is present")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    for module in ("finetune", "labels", "controller"):
        monkeypatch.setattr(f"adore.lit.{module}.load_model", no_model)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        train(make_cfg(stage, tmp_path, override))


def test_a_stage_overrides_trainer_and_train_defaults(tmp_path):
    cfg = make_cfg("controller", tmp_path)
    assert cfg.trainer.max_steps == 1000  # conf/stage/controller.yaml over conf/trainer/default.yaml
    assert compose("train", "stage=controller").train.threads == 1  # ... and over conf/train.yaml


def test_unknown_stage_is_refused_by_the_config(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="stage"):
        make_cfg("typo", tmp_path)


@pytest.mark.slow
def test_packaged_model_finetunes_with_lora_on_cpu(tmp_path):
    """peft on the de-quantised packaged GGUF backbone: one step, adapter saved, loadable by ModelSpec."""
    overrides = (
        "debug=fdr",
        "stage.datamodule.num_train=2",
        "stage.datamodule.max_length=512",
        "stage.datamodule.num_val=1",
        "stage.datamodule.batch_size=1",
        "stage.validate_before=false",
    )
    metrics, _ = train(make_cfg("finetune", tmp_path, *overrides))
    assert metrics["val/loss_full"] < 5 and metrics["val/loss_sparse"] < 5  # a trained LM, not a random one
    tuned = load_model(ModelSpec(adapter=str(tmp_path / "adapter")))
    assert tuned.config.hidden_size == 576


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path, tiny_model_dir, labels_run):
    """`trainer=ddp` as shipped runs 2 gloo processes on a CPU machine; synced metrics equal a 1-process run's."""
    import json
    import os
    import subprocess
    import sys

    common = ["stage=controller", "logger.mode=disabled", f"K={K}", "train.threads=1", f"model.name_or_path={tiny_model_dir}",
              f"stage.datamodule.labels={labels_run}", "trainer.max_steps=6", "stage.datamodule.num_val=2",
              "stage.datamodule.pairs_per_sequence=64", "trainer.enable_progress_bar=false"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    metrics = {}
    for name, extra in (
        ("one", ["stage.datamodule.batch_size=4"]),
        ("two", ["trainer=ddp", "stage.datamodule.batch_size=2"]),
    ):
        cmd = [sys.executable, "train.py", *common, *extra, f"run_dir={tmp_path / name}"]
        done = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    one, two = metrics["one"], metrics["two"]
    assert two["trainer/global_step"] == one["trainer/global_step"] == 6
    for key in one:  # top-K overlap of fixed rankings over the whole validation set: synced exactly
        if key.startswith(("before/val/recall", "val/recall_recency", "val/recall_h2o")):
            assert two[key] == pytest.approx(one[key], abs=1e-6), key
    assert two["before/val/loss"] == pytest.approx(one["before/val/loss"], abs=0.01)  # pairs are sampled per rank
    assert two["val/loss"] == pytest.approx(one["val/loss"], abs=0.02)
    assert (tmp_path / "two" / "controller.pt").is_file()


def test_labels_store_an_h2o_ranking_of_2K_by_default(tiny_model_dir):
    """The controller stage's default budget is the labels' K: the stored H2O ranking must hold it at any K."""
    from adore.lit.labels import LabelsModule

    cfg = compose("train", "stage=labels", "K=96", f"model.name_or_path={tiny_model_dir}")
    assert cfg.stage.module.h2o_k is None  # null = 2 K
    assert LabelsModule(ModelSpec(name_or_path=tiny_model_dir), K=96).h2o_k == 192
    assert LabelsModule(ModelSpec(name_or_path=tiny_model_dir), K=96, h2o_k=16).h2o_k == 16


def test_attention_summed_layer_by_layer_equals_every_layers_weights_summed(tiny_model_dir):
    """The labels stage sums attention as each layer computes it (memory of one layer): the same (B, T, T) total,
    and so the same labels, as keeping every layer's weights (`output_attentions`)."""
    from adore.lit.label_builder import aggregate_attention, attention_labels
    from adore.models import summed_attention

    model = load_model(ModelSpec(name_or_path=tiny_model_dir))  # its own copy: the attention kernel changes
    model.set_attn_implementation("eager")
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    with torch.no_grad():
        every = model.base_model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        with summed_attention(model) as totals:
            model.base_model(input_ids=ids, attention_mask=mask)
            model.base_model(input_ids=ids[:1], attention_mask=mask[:1])  # one total per forward
    assert len(totals) == 2 and torch.allclose(totals[0], aggregate_attention(every), atol=1e-6)
    valid = mask.bool()
    for a, b in zip(attention_labels(totals[0], valid, 4, 8), attention_labels(every, valid, 4, 8)):
        assert torch.equal(a, b) if a.dtype == torch.long else torch.allclose(a, b)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="needs attention weights"), summed_attention(model), torch.no_grad():
        model.base_model(input_ids=ids, attention_mask=mask)
