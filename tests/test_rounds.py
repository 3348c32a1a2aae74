"""Knowledge rounds: params ``rounds`` generates a round's stages in dvc.yaml; each round learns from
the model of the round before, and adding one runs only its own stages."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import ConfigError, SaliencyParams, knowledge_rounds, load_round
from pipeline.core.devices import FP32, resolve_precision
from pipeline.core.errors import InputError
from pipeline.core.layout import FIRST_ROUND, KnowledgeRound
from pipeline.data.prepared import PreparedData
from pipeline.evaluation.rounds import rounds_table
from pipeline.knowledge.fold_maps import write_fold_maps
from support.helpers import dvc, kgi, make_shrunk_project, stages_run, tiny_data, train_tiny_models

ROUND2 = ["round_saliency@round2", "round_pseudo_labels@round2", "round_train_guided@round2"]
ROUND3 = [name.replace("round2", "round3") for name in ROUND2]


def _set_rounds(project: Path, rounds: dict[str, str]) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["rounds"] = rounds
    (project / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = make_shrunk_project(tmp_path_factory.mktemp("rounds"))
    _set_rounds(project, {"round2": "guided"})
    output = dvc(project, "repro", "train_guided", *ROUND2)
    assert stages_run(output) == ["prepare", "train_baseline", "saliency", "pseudo_labels", "train_guided", *ROUND2]
    return project


@pytest.mark.slow
def test_adding_a_round_runs_only_its_stages_and_it_learns_from_the_round_before(project: Path) -> None:
    _set_rounds(project, {"round2": "guided", "round3": "round2"})
    output = dvc(project, "repro", "train_guided", *ROUND2, *ROUND3)
    assert stages_run(output) == ROUND3
    # Round 3's maps are round 2's model's saliency: recomputed from that model file they agree,
    # and they are not what the baseline's or round 1's model gives.
    data = PreparedData.load(project / "data/prepared")
    stored = data.load_maps(project / "data/round3_saliency/fold0", np.arange(len(data.index))).numpy()
    params = yaml.safe_load((project / "params.yaml").read_text())
    device = torch.device("cpu")
    precision = resolve_precision(params["model"]["precision"], device)  # as the stage computed them
    saliency = SaliencyParams.model_validate(params["saliency"])
    for model, same in (("round2", True), ("guided", False), ("baseline", False)):
        maps, _, _ = write_fold_maps(
            data, 0, project / f"data/{model}/fold0.pt", saliency, precision, device, project / "tmp"
        )
        assert np.allclose(maps, stored, atol=1e-4) is same, model


@pytest.mark.slow
def test_kgi_rounds_shows_each_rounds_maps_pseudo_masks_and_ap(project: Path) -> None:
    table = rounds_table(project).set_index("model")
    assert list(table.index[:3]) == ["baseline", "guided", "round2"]
    for model, prefix in (("guided", ""), ("round2", "round2_")):
        figures = {
            stage: json.loads((project / f"data/metrics/{prefix}{stage}.json").read_text())
            for stage in ("saliency", "pseudo_labels", "train_guided")
        }
        assert table.loc[model, "pointing_game"] == figures["saliency"]["pointing_game"]
        assert table.loc[model, "pseudo_mask_iou_test"] == figures["pseudo_labels"]["iou_test"]
        assert table.loc[model, "ap"] == figures["train_guided"]["test_ap_mean"]
    shown = subprocess.run(kgi("rounds", "--project", str(project)), capture_output=True, text=True, check=True)
    assert f"| 2 | round2 | guided | {100 * table.loc['round2', 'pointing_game']:.1f} |" in shown.stdout
    assert sorted(p.name for p in (project / "data/round2").glob("*.pt")) == ["fold0.pt"]


def test_the_rounds_chain_from_the_first_and_a_broken_one_is_refused_naming_the_fix() -> None:
    rounds = knowledge_rounds({"rounds": {"round2": "guided", "round3": "round2"}})
    assert rounds == {"round2": KnowledgeRound("round2", "guided"), "round3": KnowledgeRound("round3", "round2")}
    assert knowledge_rounds({"rounds": None}) == {} == knowledge_rounds({})
    for bad, expected in (
        ({"round2": "baseline"}, "'round2: guided'"),
        ({"round3": "guided"}, "'round2: guided'"),
        ({"round2": "guided", "round4": "round2"}, "'round3: round2'"),
        ({"round2": "guided", "round3": "guided"}, "'round3: round2'"),
    ):
        with pytest.raises(ConfigError, match=rf"rounds: found .* must be {expected}"):
            knowledge_rounds({"rounds": bad})
    with pytest.raises(ConfigError, match="rounds: expected a mapping"):
        knowledge_rounds({"rounds": ["round2"]})


def test_a_stage_for_an_undeclared_round_is_refused(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("rounds: {round2: guided}\n")
    assert load_round(None, params) == FIRST_ROUND
    assert load_round("round2", params).teacher == Path("data/guided")
    with pytest.raises(ConfigError, match=r"no round 'round3' \(declared: round2\)"):
        load_round("round3", params)


def test_a_round_has_its_own_files_and_the_first_round_keeps_the_pipelines() -> None:
    assert (FIRST_ROUND.teacher, FIRST_ROUND.saliency, FIRST_ROUND.model) == tuple(
        map(Path, ("data/baseline", "data/saliency", "data/guided"))
    )
    assert FIRST_ROUND.metrics("train_guided") == Path("data/metrics/train_guided.json")
    later = KnowledgeRound("round3", "round2")
    assert (later.teacher, later.saliency, later.pseudo_masks, later.model) == tuple(
        map(Path, ("data/round2", "data/round3_saliency", "data/round3_pseudo_masks", "data/round3"))
    )
    assert later.metrics("pseudo_labels") == Path("data/metrics/round3_pseudo_labels.json")
    assert later.stage("saliency") == "round_saliency@round3" and FIRST_ROUND.stage("saliency") == "saliency"


def test_a_model_that_reads_a_prior_cannot_teach_a_round(tmp_path: Path) -> None:
    paths, _ = train_tiny_models(tmp_path)
    data = tiny_data(32)
    settings = SaliencyParams()
    write_fold_maps(data, 0, paths["consistency"], settings, FP32, torch.device("cpu"), tmp_path / "maps")
    with pytest.raises(InputError, match=r"teacher\.pt: a teacher model reads a prior .* no_injection or consistency"):
        write_fold_maps(data, 0, paths["teacher"], settings, FP32, torch.device("cpu"), tmp_path / "maps")
