"""The pipeline's models, in pipeline order: what each is called, which stage makes it and where it is found.

The one place their names and labels are spelled: the eval report, the code results, the model card, `tas
compare`, `tas export`, `tas chat` and the panel all read them from here (tests/test_model_registry.py keeps
it so). Light: stdlib and `engine.config.keys` (a config is read by its dotted keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config.keys import get_key

if TYPE_CHECKING:
    from engine.config.schema import TASConfig


@dataclass(frozen=True)
class Model:
    """One model of the pipeline."""

    name: str  # its key in eval/report.json and the stem of eval/code/<name>.jsonl
    target: str  # its short name for `tas chat --target` and, when exportable, `tas export --target`
    label: str  # short (10 characters at most): the eval table and the code results
    title: str  # in sentences ("exporting the KD student of run …"), the distill log and the model card
    chat_label: str  # in the chat target list (`ChatTarget.label`)
    stage: str | None  # the stage that makes it (the teacher: runs it); None: the config's model as it is
    output_key: str | None = None  # the config key of the folder the stage writes it to; None: not written
    output_suffix: str = ""  # added to that folder's name (the CE-only control goes beside the KD student)
    proof: str = ""  # the file in that folder that shows the stage made it
    switch: str | None = None  # the config key that must be true for the stage to make it at all
    chattable: bool = True
    exportable: bool = False
    evaluated: bool = True  # the eval stage scores it (the teacher only on the code benchmark)

    def output(self, config: TASConfig) -> Path | None:
        """Where the stage writes this model (relative paths count from the run's working directory)."""
        if self.output_key is None:
            return None
        return Path(f"{get_key(config, self.output_key)}{self.output_suffix}")

    @property
    def output_where(self) -> str:
        """The config key of `output`, as a user looks it up: `train.distillation.output_dir (+ _ce)`."""
        return f"{self.output_key} (+ {self.output_suffix})" if self.output_suffix else str(self.output_key)

    def enabled(self, config: TASConfig) -> bool:
        """Whether this config makes the model at all (its `switch` is on, or it has none)."""
        return self.switch is None or bool(get_key(config, self.switch))


# The registry as a table (left unformatted: ruff would give every field a line of its own), one record a
# model: on its first line how the model is called, on the next how it is made.
# fmt: off
TEACHER = Model(
    name="teacher", target="teacher", label="teacher", title="teacher", chat_label="Teacher",
    stage="teacher",
)
ASSISTANT_BASE = Model(
    name="assistant_base", target="base", label="base asst.", title="base assistant", chat_label="Base assistant",
    stage=None,
)
ASSISTANT = Model(
    name="assistant", target="assistant", label="assistant", title="fine-tuned assistant (LoRA merged)", chat_label="Assistant + LoRA",
    stage="sft", output_key="train.sft.save_path", proof="adapter_config.json", exportable=True,
)
STUDENT_KD = Model(
    name="student_kd", target="kd", label="KD student", title="KD student", chat_label="KD student",
    stage="distill", output_key="train.distillation.output_dir", proof="config.json", exportable=True,
)
STUDENT_CE = Model(
    name="student_ce", target="ce", label="CE student", title="CE-only control student", chat_label="CE-only student",
    stage="distill", output_key="train.distillation.output_dir", output_suffix="_ce", proof="config.json",
    switch="train.distillation.ce_only_control", exportable=True,
)
# fmt: on

MODELS: tuple[Model, ...] = (TEACHER, ASSISTANT_BASE, ASSISTANT, STUDENT_KD, STUDENT_CE)
"""Every model in pipeline order: the order of the eval report, the code results, the model card and compare."""

STUDENTS: tuple[Model, ...] = tuple(m for m in MODELS if m.stage == "distill")
"""What the distill stage trains: the KD student, and the CE-only control that tells whether KD helped."""


def best_first() -> tuple[Model, ...]:
    """The order a user is offered them (chat targets, export targets): the students, KD first, then back up
    the pipeline: the fine-tuned assistant, its base, the teacher."""
    return STUDENTS + tuple(m for m in reversed(MODELS) if m not in STUDENTS)


def model(name: str) -> Model:
    """The model named `name` in the eval report; KeyError for a name that is not one of ours."""
    for candidate in MODELS:
        if candidate.name == name:
            return candidate
    raise KeyError(f"unknown model {name!r}; models are {', '.join(m.name for m in MODELS)}")


def by_target(target: str) -> Model:
    """The model of a `--target` short name (kd, ce, assistant, base, teacher); KeyError for another."""
    for candidate in MODELS:
        if candidate.target == target:
            return candidate
    raise KeyError(f"unknown target {target!r}; targets are {', '.join(m.target for m in best_first())}")


def label_of(name: str) -> str:
    """The short label of the model `name`, or `name` itself for one that is not ours (an older report)."""
    return next((m.label for m in MODELS if m.name == name), name)


def order_key(name: str) -> tuple[int, str]:
    """Sorts model names in pipeline order; names that are not ours come last, alphabetically."""
    names = [m.name for m in MODELS]
    return (names.index(name) if name in names else len(names), name)
