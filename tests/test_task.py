"""load_task: real imports of user task modules written to a temporary directory."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from p2pfed.errors import ConfigError
from p2pfed.task import NodeData, RoundContext, Task, TrainResult, load_task

TASK_SOURCE = """
import torch
from p2pfed.task import NodeData, TrainResult


class Tiny:
    name = "tiny-v1"

    def build_model(self, config):
        return torch.nn.Linear(2, 1)

    def load_data(self, config):
        x = torch.ones(4, 2)
        return NodeData(train=(x, x.sum(1, keepdim=True)), test=(x, x.sum(1, keepdim=True)),
                        num_train=4, num_test=4)

    def train(self, model, data, config, generator):
        return TrainResult(samples=data.num_train, loss=0.5)

    def evaluate(self, model, data, config):
        return {"accuracy": 1.0, "loss": 0.0}


task = Tiny()


def make_task():
    return Tiny()


class Registry:
    tiny = Tiny()


class NoEvaluate:
    name = "half"

    def build_model(self, config): ...
    def load_data(self, config): ...
    def train(self, model, data, config, generator): ...


half = NoEvaluate()
nameless = type("Nameless", (Tiny,), {"name": ""})()


def broken_factory():
    raise RuntimeError("no GPU")
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    package = tmp_path / "usertasks_p2pfed_test"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tiny.py").write_text(TASK_SOURCE)
    (package / "needs_dep.py").write_text("import surely_not_installed_p2pfed_dep\n")
    (package / "raises.py").write_text("raise ValueError('bad config at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "usertasks_p2pfed_test"
    for name in [m for m in sys.modules if m.startswith("usertasks_p2pfed_test")]:
        del sys.modules[name]


@pytest.mark.parametrize("obj", ["task", "Tiny", "make_task", "Registry.tiny"])
def test_load_instance_class_factory_and_dotted_path(user_module: str, obj: str) -> None:
    task = load_task(f"{user_module}.tiny:{obj}")
    assert isinstance(task, Task)
    assert task.name == "tiny-v1"
    model = task.build_model({})
    data = task.load_data({})
    result = task.train(model, data, {}, torch.Generator().manual_seed(0))
    assert result == TrainResult(samples=4, loss=0.5)
    assert task.evaluate(model, data, {})["accuracy"] == 1.0


def test_builtin_demo_task_loads() -> None:
    task = load_task("p2pfed.tasks.digits:task")
    assert task.name == "p2pfed-digits-mlp-v1"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no_colon_here", r'must be "package\.module:object"'),
        ("a.b:", r'must be "package\.module:object"'),
        ("1bad:task", r'must be "package\.module:object"'),
        (
            "missing_pkg_p2pfed_zz.mod:task",
            r"module 'missing_pkg_p2pfed_zz\.mod' not found.*PYTHONPATH",
        ),
        ("{m}.nope:task", r"module '{m}\.nope' not found"),
        ("{m}.needs_dep:task", r"needs module 'surely_not_installed_p2pfed_dep'.*pip install"),
        ("{m}.raises:task", r"raised ValueError: bad config at import"),
        ("{m}.tiny:tsak", r"has no attribute 'tsak' \(it has: .*make_task.*task"),
        ("{m}.tiny:Registry.nope", r"'{m}\.tiny:Registry' has no attribute 'nope'"),
        ("{m}.tiny:half", r"lacks evaluate; a task needs name, build_model"),
        ("{m}.tiny:nameless", r"lacks name \(a non-empty str attribute\)"),
        ("{m}.tiny:broken_factory", r"factory 'broken_factory'.*RuntimeError: no GPU"),
        ("{m}.tiny:NodeData", r"calling the class 'NodeData' without arguments raised"),
    ],
)
def test_load_task_errors_say_what_to_fix(user_module: str, spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match.format(m=user_module)):
        load_task(spec.format(m=user_module))


def test_object_that_is_not_a_task_lists_every_missing_member(user_module: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_task(f"{user_module}.tiny:torch")  # a module object: callable? no; lacks all
    message = str(info.value)
    for member in ("name", "build_model", "load_data", "train", "evaluate"):
        assert member in message


def test_node_data_counts_are_checked() -> None:
    with pytest.raises(ConfigError, match="num_train must be an integer >= 0"):
        NodeData(train=None, test=None, num_train=-1, num_test=0)
    with pytest.raises(ConfigError, match="num_test"):
        NodeData(train=None, test=None, num_train=1, num_test=True)  # type: ignore[arg-type]


def test_module_docstring_example_task_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import p2pfed.task

    doc = p2pfed.task.__doc__ or ""
    start = doc.index("    # mytasks/linreg.py")
    end = doc.index("    task = LinRegTask()") + len("    task = LinRegTask()")
    source = textwrap.dedent(doc[start:end])
    package = tmp_path / "mytasks_p2pfed_doc"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "linreg.py").write_text(source)
    rows = [[i, i % 3, 1.0, 2.0 * i - (i % 3) + 0.5] for i in range(20)]
    csv = tmp_path / "mine.csv"
    csv.write_text("\n".join(",".join(str(v) for v in row) for row in rows) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        task = load_task("mytasks_p2pfed_doc.linreg:task")
        config = {"csv": str(csv), "seed": 1, "lr": 0.001}
        model = task.build_model(config)
        data = task.load_data(config)
        assert (data.num_train, data.num_test) == (16, 4)
        context = RoundContext(round=0, local_round=0)
        result = task.train(model, data, config, torch.Generator().manual_seed(0), context)
        assert result.samples == 16
        metrics = task.evaluate(model, data, config)
        assert set(metrics) == {"loss", "accuracy"} and 0.0 <= metrics["accuracy"] <= 1.0
    finally:
        for name in [m for m in sys.modules if m.startswith("mytasks_p2pfed_doc")]:
            del sys.modules[name]
