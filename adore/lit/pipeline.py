"""`python pipeline.py`: finetune -> labels -> controller -> evaluation on one backbone, resumable.

Each stage is the ordinary `train.py` / `eval.py` command, run as its own process into a fixed folder under
`out`, so that every stage finds the previous one's output without anyone pasting run paths:

    out/finetune/adapter             (setting=finetuned; the adapter every later stage loads)
    out/labels_<data>/labels/labels.pt
    out/controller_<recipe>/controller.pt
    out/eval/...                     (eval.py's own run folders: finished runs are skipped)

A stage whose output exists is skipped; a training stage with a checkpoint but no output resumes from it
(`train.resume=true`). The evaluation is one Hydra multirun per group of methods; eval.py skips finished runs.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from adore.engine.rebuild import POLICIES
from adore.methods.rebuilds import ALIASES

SETTINGS = ("base", "finetuned")
STAGES = ("finetune", "labels", "controller", "evaluation")
REBUILDS = ["recall", "recompute"]  # every controller's rows: the shipped recipe's rule and the paper's


@dataclass
class Stage:
    kind: str  # one of STAGES
    name: str
    command: list[str]
    output: Path | None  # exists once the stage is finished (None: always run; eval.py skips its finished runs)
    checkpoints: Path | None = None  # a training stage's checkpoints (resume from last.ckpt)


@dataclass
class Pipeline:
    """The stages of one setting (conf/pipeline.yaml)."""

    setting: str
    out: str
    backbone: str
    backbone_overrides: list[str]
    train_data: str
    K: int
    finetune: list[str] = field(default_factory=list)
    labels: dict = field(default_factory=dict)
    controller: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    python: str | None = None
    until: str = "evaluation"

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise ValueError(f"setting={self.setting!r}: use one of {SETTINGS}")
        if self.until not in STAGES:
            raise ValueError(f"until={self.until!r}: use one of {STAGES}")
        self.root = Path(self.out)
        self.python = self.python or sys.executable
        recipes = Path(__file__).resolve().parents[2] / "conf" / "recipe"
        for recipe in self.controller.get("recipes", []):
            if recipes.is_dir() and not (recipes / f"{recipe}.yaml").is_file():
                raise ValueError(
                    f"controller.recipes has {recipe!r}: choose from conf/recipe ({sorted(p.stem for p in recipes.glob('*.yaml'))})"
                )
        policies = self.evaluation.get("rebuild", REBUILDS)
        if isinstance(policies, str) or not policies:
            raise ValueError(f"evaluation.rebuild={policies!r}: give a non-empty list, e.g. [recall,recompute]")
        for policy in policies:
            if ALIASES.get(policy, policy) not in POLICIES:
                raise ValueError(f"evaluation.rebuild has {policy!r}: choose from {list(POLICIES)}")
        if not self.labels.get("data"):
            raise ValueError("labels.data is empty: name at least one dataset to label (e.g. [samsum])")
        unknown = sorted(set(self.labels.get("per_data") or {}) - set(self.labels["data"]))
        if unknown:
            raise ValueError(
                f"labels.per_data names {unknown}, which labels.data {list(self.labels['data'])} does not label"
            )

    @property
    def adapter(self) -> Path | None:
        return self.root / "finetune" / "adapter" if self.setting == "finetuned" else None

    def _backbone(self) -> list[str]:
        adapter = [f"model.adapter={self.adapter}"] if self.adapter else []
        return [f"model={self.backbone}", *self.backbone_overrides, *adapter]

    def _train(self, stage: str, folder: str, *overrides: str) -> list[str]:
        return [
            self.python,
            "train.py",
            f"stage={stage}",
            f"hydra.run.dir={self.root / folder}",
            f"K={self.K}",
            *overrides,
        ]

    def stages(self) -> list[Stage]:
        """The stages to run, in order, up to and including `until`."""
        return [s for s in self._all_stages() if STAGES.index(s.kind) <= STAGES.index(self.until)]

    def _all_stages(self) -> list[Stage]:
        out = []
        if self.setting == "finetuned":
            out.append(Stage("finetune", "finetune", self._train("finetune", "finetune", f"model={self.backbone}", *self.backbone_overrides, f"data={self.train_data}", *self.finetune),
                             self.root / "finetune" / "adapter", self.root / "finetune" / "checkpoints"))  # fmt: skip
        for data in self.labels["data"]:
            folder = f"labels_{data}"
            overrides = [*self.labels.get("overrides", []), *(self.labels.get("per_data") or {}).get(data, [])]
            out.append(Stage("labels", f"labels {data}", self._train("labels", folder, *self._backbone(), f"data={data}", *overrides),
                             self.root / folder / "labels" / "labels.pt"))  # fmt: skip
        pooled = "[" + ",".join(str(self.root / f"labels_{d}") for d in self.labels["data"]) + "]"
        for recipe in self.controller.get("recipes", []):
            folder = f"controller_{recipe}"
            command = self._train("controller", folder, *self._backbone(), f"recipe={recipe}",
                                  f"stage.datamodule.labels={pooled}", *self.controller.get("overrides", []))  # fmt: skip
            out.append(
                Stage(
                    "controller",
                    f"controller {recipe}",
                    command,
                    self.root / folder / "controller.pt",
                    self.root / folder / "checkpoints",
                )
            )
        return out + self.evaluations()

    def controllers(self) -> list[Path]:
        return [self.root / f"controller_{r}" / "controller.pt" for r in self.controller.get("recipes", [])]

    def evaluations(self) -> list[Stage]:
        ev = self.evaluation
        common = [*self._backbone(), f"out_root={self.root / 'eval'}", "data=" + ",".join(ev["data"]),
                  "budget=" + ",".join(map(str, ev["budgets"])), *ev.get("overrides", [])]  # fmt: skip
        runs = [
            Stage(
                "evaluation",
                "evaluate baselines",
                [self.python, "eval.py", "-m", "method=" + ",".join(ev["baselines"]), *common],
                None,
            )
        ]
        if self.controllers():
            controllers = ",".join(str(p) for p in self.controllers())
            R = ",".join(map(str, ev.get("R", [4])))
            every = ",".join(map(str, ev.get("rebuild_every", [1])))
            rebuild = ",".join(ev.get("rebuild", REBUILDS))
            for extra in ["", *ev.get("adore", [])]:
                command = [
                    self.python,
                    "eval.py",
                    "-m",
                    "method=adore",
                    f"method.controller={controllers}",
                    f"method.R={R}",
                    f"method.rebuild_every={every}",
                    f"method.rebuild={rebuild}",
                    *shlex.split(extra),
                    *common,
                ]
                runs.append(Stage("evaluation", "evaluate ADORE" + (f" ({extra})" if extra else ""), command, None))
        return runs

    def run(self) -> None:
        stages = self.stages()
        started = time.time()
        for k, stage in enumerate(stages, 1):
            head = f"[pipeline {self.setting} {k}/{len(stages)}] {stage.name}"
            if stage.output is not None and stage.output.exists():
                print(f"{head}: done ({stage.output})")
                continue
            command = list(stage.command)
            if stage.checkpoints is not None and (stage.checkpoints / "last.ckpt").exists():
                command.append("train.resume=true")
                print(f"{head}: resuming from {stage.checkpoints / 'last.ckpt'}")
            print(f"{head}: {shlex.join(command[1:])}", flush=True)
            t0 = time.time()
            done = subprocess.run(command, cwd=Path(__file__).resolve().parents[2])
            if done.returncode != 0:
                sys.exit(
                    f"[pipeline] {stage.name} failed (exit {done.returncode}); fix it and rerun: finished stages are kept"
                )
            print(f"{head}: finished in {time.time() - t0:.0f} s", flush=True)
        print(f"[pipeline {self.setting}] all {len(stages)} stages done in {time.time() - started:.0f} s; "
              f"report: python -m adore.report {self.root / 'eval'}")  # fmt: skip
