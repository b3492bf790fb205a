"""Each component is a KFP lightweight component on the runtime image with typed artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.cleanup.component import cleanup_jobs
from components.data_mix.component import data_mix
from components.detect_insight.component import detect_insight
from components.evaluate.component import evaluate
from components.grpo.component import grpo
from components.pretrain.component import pretrain
from components.registry.component import champion, champion_uri, promote
from components.summarize.component import summarize
from r1zero.images import RUNTIME_IMAGE

REPO = Path(__file__).resolve().parents[2]
ALL = [data_mix, pretrain, grpo, evaluate, detect_insight, champion, champion_uri, promote, summarize, cleanup_jobs]


def _io(comp):
    spec = comp.component_spec
    ins = {k: v.type for k, v in (spec.inputs or {}).items()}
    outs = {k: v.type for k, v in (spec.outputs or {}).items()}
    return ins, outs


@pytest.mark.parametrize("comp", ALL, ids=lambda c: c.name)
def test_runs_on_the_runtime_image(comp):
    assert comp.component_spec.implementation.container.image == RUNTIME_IMAGE


def test_typed_artifacts():
    assert _io(data_mix)[1] == {"data": "system.Dataset@0.0.1", "metrics": "system.Metrics@0.0.1",
                                "uri": "String", "seconds": "Float"}
    ins, outs = _io(pretrain)
    # models and data travel as URIs (an input artifact would be downloaded into the CPU pod)
    assert ins["data_uri"] == "String" and outs["model"] == "system.Model@0.0.1" and outs["Output"] == "String"
    assert outs["curves"] == "system.Artifact@0.0.1"
    ins, outs = _io(grpo)
    assert ins["base_uri"] == "String" and outs["model"] == "system.Model@0.0.1"
    ins, outs = _io(evaluate)
    assert ins["model_uri"] == "String" and ins["target"] == "String"
    assert outs["report"] == "system.HTML@0.0.1" and outs["Output"] == "Float"
    assert comp_optional(evaluate, "baseline") and comp_optional(evaluate, "curves")
    assert _io(detect_insight)[0]["curves"] == "system.Artifact@0.0.1"
    assert _io(summarize)[1]["table"] == "system.Markdown@0.0.1"
    assert not {t for t in _io(summarize)[0].values()} & {"system.Model@0.0.1", "system.Dataset@0.0.1"}


def comp_optional(comp, name: str) -> bool:
    return bool(comp.component_spec.inputs[name].optional)


@pytest.mark.parametrize("name", ["data_mix", "pretrain", "grpo", "evaluate", "detect_insight"])
def test_each_stage_component_has_a_readme(name):
    text = (REPO / "components" / name / "README.md").read_text()
    assert "Inputs:" in text and "Outputs:" in text
