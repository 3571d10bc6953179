"""``p2pfed export``: the node's checkpointed model, loaded back into the task's model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from p2pfed.checkpoint import Checkpoint, save_checkpoint
from p2pfed.cli import main
from p2pfed.federation import load_federation
from p2pfed.model_vector import model_fingerprint, model_to_vector
from p2pfed.node import CHECKPOINT_FILE_NAME, federation_seed
from p2pfed.task import RoundContext
from p2pfed.tasks.digits import task

SETTINGS = {"node_index": 0, "num_nodes": 2, "hidden": 10}


def _trained_node(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A node directory whose checkpoint holds a digits model trained for one round."""
    node_dir = tmp_path / "node"
    assert main(["init", str(node_dir)]) == 0
    assert main(["federation", "new", "t", "-o", str(node_dir / "federation.toml")]) == 0
    (node_dir / "config.toml").write_text(
        'mdns = false\n\n[task]\nname = "p2pfed.tasks.digits:task"\n'
        + "".join(f"{k} = {v}\n" for k, v in SETTINGS.items()),
        encoding="utf-8",
    )
    seed = federation_seed(load_federation(node_dir / "federation.toml"))
    config = {**SETTINGS, "seed": seed}
    model = task.build_model(config)
    data = task.load_data(config)
    task.train(model, data, config, torch.Generator().manual_seed(3), RoundContext(0, 0))
    save_checkpoint(
        node_dir / CHECKPOINT_FILE_NAME,
        Checkpoint(
            round=1,
            model=model_to_vector(model),
            weight=float(data.num_train),
            fingerprint=model_fingerprint(model, task.name),
            trained=True,
        ),
    )
    return node_dir, model


def _fresh_model() -> torch.nn.Module:
    # another seed: the loaded file, not the initial values, must make it equal
    return task.build_model({**SETTINGS, "seed": 12345})


def _assert_same(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    for (name, a), (_, b) in zip(
        model.state_dict().items(), expected.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    config = {**SETTINGS, "seed": 0}
    data = task.load_data(config)
    assert task.evaluate(model, data, config) == task.evaluate(expected, data, config)


def test_export_pt_round_trips_into_the_tasks_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node_dir, trained = _trained_node(tmp_path)
    out = tmp_path / "model.pt"
    assert main(["export", str(node_dir), "-o", str(out)]) == 0
    assert "round 1 of p2pfed-digits-mlp-v1, 760 parameters (torch state_dict)" in (
        capsys.readouterr().out
    )
    model = _fresh_model()
    model.load_state_dict(torch.load(out, weights_only=True))
    _assert_same(model, trained)
    # an existing file is kept unless --force
    assert main(["export", str(node_dir), "-o", str(out)]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["export", str(node_dir), "-o", str(out), "--force"]) == 0


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="no safetensors")
def test_export_safetensors_round_trips(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_model

    node_dir, trained = _trained_node(tmp_path)
    out = tmp_path / "model.safetensors"
    assert main(["export", str(node_dir), "-o", str(out)]) == 0
    model = _fresh_model()
    load_model(model, str(out))
    _assert_same(model, trained)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["p2pfed_round"] == "1"
        assert f.metadata()["p2pfed_task"] == task.name


def test_safetensors_missing_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    node_dir, _ = _trained_node(tmp_path)
    # hide the installed package the way an environment without it looks to importlib
    real_find_spec = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "safetensors" else real_find_spec(name, *a),
    )
    capsys.readouterr()
    assert main(["export", str(node_dir), "-o", str(tmp_path / "m.safetensors")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "p2pfed: error: writing m.safetensors needs the safetensors package, which is not "
        "installed (pip install safetensors, or name the output .pt for a torch state_dict)"
    ]
    assert not (tmp_path / "m.safetensors").exists()


def test_export_wrong_settings_or_no_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node_dir, _ = _trained_node(tmp_path)
    assert main(["export", str(node_dir), "-o", str(tmp_path / "a.pt"), "--set", "hidden=5"]) == 1
    assert "pass the --task and --set settings the node ran with" in capsys.readouterr().err
    (node_dir / CHECKPOINT_FILE_NAME).unlink()
    assert main(["export", str(node_dir), "-o", str(tmp_path / "b.pt")]) == 1
    assert "has no model yet" in capsys.readouterr().err
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()
