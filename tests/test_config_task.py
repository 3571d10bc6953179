"""The ``[task]`` table of config.toml: the task's name and settings, as the docs say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from p2pfed.cli import main
from p2pfed.config import NodeConfig, default_config_text, load_config, parse_config
from p2pfed.errors import ConfigError
from p2pfed.network import TcpNetwork
from p2pfed.node import Node, NodeOptions


def test_table_names_the_task_and_holds_its_settings() -> None:
    config = parse_config(
        'mdns = false\n[task]\nname = "p2pfed.tasks.digits:task"\nnum_nodes = 3\n'
        "lr = 0.05\nlayers = [32, 16]\n"
    )
    assert config.task == "p2pfed.tasks.digits:task"
    assert config.task_settings == {"num_nodes": 3, "lr": 0.05, "layers": [32, 16]}
    assert not config.mdns


def test_one_line_form_still_works_without_settings() -> None:
    config = parse_config('task = "p2pfed.tasks.digits:task"\n')
    assert config.task == "p2pfed.tasks.digits:task" and config.task_settings == {}


def test_table_without_name_leaves_the_task_to_the_command_line() -> None:
    config = parse_config("[task]\nnum_nodes = 3\n")
    assert config.task is None and config.task_settings == {"num_nodes": 3}


def test_bad_name_in_table_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r'^c.toml: \[task\] name: must be "package.module'):
        parse_config('[task]\nname = "not a task"\n', source="c.toml")
    with pytest.raises(ConfigError, match=r"\[task\] name: .*got 3"):
        parse_config("[task]\nname = 3\n")


def test_other_tables_are_still_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key.*task_settings"):
        parse_config("[task_settings]\nlr = 1\n")


def test_default_file_documents_the_table_and_its_example_works() -> None:
    text = default_config_text()
    assert "[task]" in text and 'name = "mypackage.tasks:task"' in text
    uncommented = re.sub(r"^#   ", "", text, flags=re.MULTILINE)
    config = parse_config(uncommented)
    assert config.task == "mypackage.tasks:task"
    assert config.task_settings == {"lr": 0.05, "data_dir": "/data/mine"}


def test_threads_and_device_are_node_settings_with_defaults() -> None:
    assert (NodeConfig().torch_threads, NodeConfig().device) == (1, "cpu")
    config = parse_config('torch_threads = 0\ndevice = "cuda:1"\n')
    assert (config.torch_threads, config.device) == (0, "cuda:1")
    with pytest.raises(ConfigError, match="torch_threads: must be between 0"):
        parse_config("torch_threads = -1\n")
    with pytest.raises(ConfigError, match="device: must be a torch device"):
        parse_config('device = "GPU 1"\n')


def _node_dir(tmp_path: Path, config_text: str) -> Path:
    node_dir = tmp_path / "node"
    assert main(["init", str(node_dir)]) == 0
    assert main(["federation", "new", "t", "-o", str(node_dir / "federation.toml")]) == 0
    (node_dir / "config.toml").write_text(config_text, encoding="utf-8")
    return node_dir


def _prepared(node_dir: Path, options: NodeOptions | None = None) -> tuple[int, int]:
    """Hidden width of the digits model and size of the training data the node gets."""
    node = Node.from_directory(node_dir, network=TcpNetwork(mdns=False), options=options)
    model, data = node._prepare_task()
    assert data is not None
    first = next(model.children())
    assert isinstance(first, torch.nn.Linear)
    return first.out_features, data.num_train


def test_settings_of_the_table_reach_the_task(tmp_path: Path) -> None:
    node_dir = _node_dir(
        tmp_path,
        'listen_host = "127.0.0.1"\nmdns = false\n\n[task]\nname = "p2pfed.tasks.digits:task"\n'
        "node_index = 1\nnum_nodes = 3\nhidden = 12\n",
    )
    assert load_config(node_dir).task_settings["hidden"] == 12
    hidden, first = _prepared(node_dir)
    assert hidden == 12
    # --set (NodeOptions.task_config) overrides the table, key by key
    hidden, other = _prepared(node_dir, NodeOptions(task_config={"hidden": 7, "node_index": 2}))
    assert hidden == 7 and other != first


def test_digits_error_advice_works_when_followed(tmp_path: Path) -> None:
    text = 'mdns = false\n\n[task]\nname = "p2pfed.tasks.digits:task"\nnode_index = 0\n'
    node_dir = _node_dir(tmp_path, text)
    with pytest.raises(ConfigError, match=r"put num_nodes = N in the \[task\] table") as info:
        _prepared(node_dir)
    assert "--set num_nodes=N" in str(info.value)
    (node_dir / "config.toml").write_text(text + "num_nodes = 2\n", encoding="utf-8")
    assert _prepared(node_dir)[0] == 32


def test_missing_task_says_both_forms(tmp_path: Path) -> None:
    node_dir = _node_dir(tmp_path, "mdns = false\n[task]\nnum_nodes = 2\n")
    with pytest.raises(ConfigError, match=r"no task configured.*\[task\] table"):
        Node.from_directory(node_dir, network=TcpNetwork(mdns=False))


def test_unusable_device_is_a_clear_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    node_dir = _node_dir(
        tmp_path,
        'mdns = false\ndevice = "cuda"\n[task]\nname = "p2pfed.tasks.digits:task"\n'
        "node_index = 0\nnum_nodes = 2\n",
    )
    with pytest.raises(ConfigError, match=r"no usable CUDA GPU.*device = \"cpu\""):
        _prepared(node_dir)
