"""The task API: what a user writes so that p2pfed can train their model on their data.

A *task* is any object with a ``name`` and four methods (the :class:`Task` protocol). The
node calls them; p2pfed never looks inside the data and only reads and writes the model's
parameters (as one float32 vector, :mod:`p2pfed.model_vector`):

``build_model(config) -> torch.nn.Module``
    The model, with the *same architecture* on every node of the federation (names, order,
    shapes and dtype float32 of the parameters; the node refuses to average with peers whose
    :func:`~p2pfed.model_vector.model_fingerprint` differs). Initial values should be the
    same on every node too: seed them from ``config`` with a local ``torch.Generator``.
``load_data(config) -> NodeData``
    *This node's* private data, train and test parts. Never sent anywhere.
``train(model, data, config, generator, context) -> TrainResult``
    Local training, in place, starting from the parameters the node put into ``model``. Use
    ``generator`` (a seeded ``torch.Generator``) for every random choice, never the global
    RNG. ``context`` (a :class:`RoundContext`) says which round this is: the federation
    round the result will be averaged into and how many times this node has trained before,
    for learning-rate schedules and reproducible batch orders. ``config`` is this round's
    configuration (see ``configure_round`` below). The returned :class:`TrainResult` feeds
    the node's logs and metrics; its ``weight`` (default: ``data.num_train``) is the node's
    weight in the next average, as FedAvg weights clients. With node-level differential
    privacy (``dp_level = "node"``) the node clips and noises ``trained - start``
    afterwards; ``train`` itself does nothing special. With record-level DP
    (``dp_level = "record"``) the node does not call ``train``: it runs DP-SGD itself
    (:mod:`p2pfed.dp_sgd`) on ``data.train`` as an ``(inputs, targets)`` pair of tensors,
    with the task's optional ``loss(outputs, targets)`` method (cross-entropy for integer
    targets otherwise) and the learning rate of its ``lr`` setting. (A task written for the
    older four-argument form, without ``context``, still works.)
``evaluate(model, data, config) -> dict[str, float]``
    Metrics on ``data.test``; at least ``"accuracy"`` (a fraction in [0, 1]) and ``"loss"``.
    The node logs them; they never leave the node.

``config`` is a plain dict: the settings of the ``[task]`` table of the node's
``config.toml`` (every key but ``name``), overridden by ``p2pfed node --set KEY=VALUE``,
plus two keys the node adds unless they are set: ``seed`` (the same on every node of a
federation, for the initial model) and ``device`` (config.toml's ``device``, ``"cpu"`` by
default). ``p2pfed run`` and the demo write ``node_index`` and ``num_nodes`` into each
node's ``[task]`` table. A task reads what it needs, with defaults, and raises
:class:`~p2pfed.errors.ConfigError` for bad values, naming the key as ``[task] KEY``.

Threads and devices: the node sets torch's thread count to config.toml's
``torch_threads`` (1 by default, because co-located nodes would otherwise oversubscribe the
cores; 0 keeps torch's default of one thread per core) before it builds the model. A task
that can use a GPU moves its model (in ``build_model``) and each batch to
``config["device"]``; the node checks that device exists (:func:`check_device`), reads the
parameters back to the CPU to average them and writes the average into the model where it
lives.

Optionally, ``configure_round(round, config) -> Mapping`` returns per-round overrides of
``config`` (a learning-rate schedule, the number of local epochs), in the manner of Flower's
``on_fit_config_fn``: the node merges them into the ``config`` that ``train`` receives for
that round. Every node of a federation computes the same schedule from the same round.

The node finds the task from the ``task = "package.module:object"`` setting with
:func:`load_task`; ``object`` may be a task instance, or a class or factory function that
returns one when called without arguments. The module must be importable (installed, or its
directory on ``PYTHONPATH``).

A complete minimal task (linear regression on one node's CSV file)::

    # mytasks/linreg.py          config.toml:  [task]
    #                                          name = "mytasks.linreg:task"
    #                                          csv = "/data/mine.csv"
    import numpy as np
    import torch
    from p2pfed.task import NodeData, TrainResult


    class LinRegTask:
        name = "linreg-v1"     # part of the model fingerprint: change it when the model changes

        def build_model(self, config):
            g = torch.Generator().manual_seed(int(config.get("seed", 0)))
            model = torch.nn.Linear(3, 1)
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            return model

        def load_data(self, config):
            table = torch.from_numpy(np.loadtxt(config["csv"], delimiter=",", ndmin=2))
            x, y = table[:, :3].float(), table[:, 3:].float()
            cut = int(0.8 * len(x))
            return NodeData(train=(x[:cut], y[:cut]), test=(x[cut:], y[cut:]),
                            num_train=cut, num_test=len(x) - cut)

        def train(self, model, data, config, generator, context):
            x, y = data.train
            opt = torch.optim.SGD(model.parameters(), lr=float(config.get("lr", 0.05)))
            total = 0.0
            for i in torch.randperm(len(x), generator=generator).split(16):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x[i]), y[i])
                loss.backward()
                opt.step()
                total += loss.item() * len(i)
            return TrainResult(samples=len(x), loss=total / len(x))

        def evaluate(self, model, data, config):
            x, y = data.test
            with torch.no_grad():
                mse = float(torch.nn.functional.mse_loss(model(x), y))
            return {"loss": mse, "accuracy": 1.0 / (1.0 + mse)}   # any score in [0, 1]


    task = LinRegTask()

The built-in demo task, :mod:`p2pfed.tasks.digits`, is a fuller example; ``examples/``
in the repository has a CNN, a tabular model and a simnet topology.

The trained model: ``p2pfed export NODE_DIR -o model.pt`` writes the node's current model
(the parameters of its last checkpoint) as a torch ``state_dict``; ``-o model.safetensors``
writes the safetensors format instead (``pip install safetensors``). Load it into the
task's model::

    model = task.build_model(config)              # the node's [task] settings
    model.load_state_dict(torch.load("model.pt", weights_only=True))
    # or: from safetensors.torch import load_model; load_model(model, "model.safetensors")

Buffers (BatchNorm statistics) are never averaged; the file holds this node's own.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from p2pfed.errors import ConfigError

__all__ = [
    "TASK_METHODS",
    "NodeData",
    "RoundContext",
    "Task",
    "TrainResult",
    "call_train",
    "check_device",
    "load_task",
    "round_config",
]

TASK_METHODS = ("build_model", "load_data", "train", "evaluate")
"""The methods every task must have (besides the ``name`` attribute)."""

_SPEC_RE = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")


@dataclass
class NodeData:
    """One node's local data. p2pfed treats ``train`` and ``test`` as opaque.

    ``num_train`` is the number of training examples: the node's weight in plain averaging
    (with DP on, spec/privacy.md recommends a data-independent weight instead).
    """

    train: Any
    test: Any
    num_train: int
    num_test: int

    def __post_init__(self) -> None:
        for field_name in ("num_train", "num_test"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(
                    f"NodeData.{field_name} must be an integer >= 0, got {value!r}; "
                    "the task's load_data must count its examples"
                )


@dataclass(frozen=True)
class TrainResult:
    """What one call of :meth:`Task.train` did: examples processed and mean training loss.

    ``weight`` is the node's training weight in the next average (FedAvg's ``n_k``);
    ``None`` means ``data.num_train``, the number of training examples. A task may declare
    another non-negative integer (for example the number of examples actually seen, or 0
    to contribute nothing this round). spec/group.md, "Weights", says how it is used.
    """

    samples: int
    loss: float
    weight: int | None = None


@dataclass(frozen=True)
class RoundContext:
    """Which round a call of :meth:`Task.train` belongs to.

    ``round``
        the federation round this training feeds: the node's count of completed rounds
        (0 for the first), so that every node trains round ``r`` from the average of
        round ``r - 1``. A node that adopted a peer's model at start-up starts from that
        peer's round.
    ``local_round``
        how many times *this node* has trained before (its own data's epochs count), which
        differs from ``round`` for a node that joined late or restarted from a peer's model.
    ``node_seed``
        a seed private to this node and round, for tasks that draw their batch order
        themselves instead of from the ``generator`` argument.
    """

    round: int
    local_round: int
    node_seed: int = 0


@runtime_checkable
class Task(Protocol):
    """The interface a training task implements (see the module docstring for an example)."""

    name: str

    def build_model(self, config: Mapping[str, Any]) -> torch.nn.Module:
        """The model, with the same architecture (and ideally initial values) on every node."""
        ...

    def load_data(self, config: Mapping[str, Any]) -> NodeData:
        """This node's private training and test data."""
        ...

    def train(
        self,
        model: torch.nn.Module,
        data: NodeData,
        config: Mapping[str, Any],
        generator: torch.Generator,
        context: RoundContext,
    ) -> TrainResult:
        """Train ``model`` in place on ``data.train``, drawing randomness from ``generator``."""
        ...

    def evaluate(
        self, model: torch.nn.Module, data: NodeData, config: Mapping[str, Any]
    ) -> dict[str, float]:
        """Metrics on ``data.test``: at least ``"accuracy"`` and ``"loss"``."""
        ...


def round_config(task: object, round: int, config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with the task's overrides for ``round`` (its optional ``configure_round``).

    Example::

        >>> class Halving:
        ...     def configure_round(self, round, config):
        ...         return {"lr": config["lr"] / 2 ** (round // 10)}
        >>> round_config(Halving(), 25, {"lr": 0.4, "batch_size": 32})
        {'lr': 0.1, 'batch_size': 32}
    """
    merged = dict(config)
    configure = getattr(task, "configure_round", None)
    if callable(configure):
        overrides = configure(round, merged)
        if overrides is not None and not isinstance(overrides, Mapping):
            raise ConfigError(
                f"the task's configure_round returned {type(overrides).__name__}; it must "
                "return a mapping of settings (or None)"
            )
        merged.update(overrides or {})
    return merged


def _takes_context(train: Any) -> bool:
    """Whether a task's ``train`` accepts the fifth argument, ``context``."""
    try:
        parameters = inspect.signature(train).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [
        p
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    variadic = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)
    return variadic or len(positional) >= 5


def call_train(
    task: Task,
    model: torch.nn.Module,
    data: NodeData,
    config: Mapping[str, Any],
    generator: torch.Generator,
    context: RoundContext,
) -> TrainResult:
    """Call ``task.train`` with ``context`` (or without, for a task of the older form), and
    check what it returns: a :class:`TrainResult` (``None`` is read as "no report")."""
    if _takes_context(task.train):
        result = task.train(model, data, config, generator, context)
    else:
        result = task.train(model, data, config, generator)  # type: ignore[call-arg]
    if result is None:
        return TrainResult(samples=data.num_train, loss=math.nan)
    if not isinstance(result, TrainResult):
        raise ConfigError(
            f"the task's train returned {type(result).__name__}; it must return a "
            "p2pfed.task.TrainResult(samples, loss)"
        )
    weight = result.weight
    if weight is not None and (
        isinstance(weight, bool) or not isinstance(weight, int) or weight < 0
    ):
        raise ConfigError(
            f"the task's TrainResult.weight must be an integer >= 0 or None, got {weight!r}"
        )
    return result


def check_device(name: str) -> str:
    """``name`` if torch can place tensors on that device here, else a :class:`ConfigError`.

    Example::

        >>> check_device("cpu")
        'cpu'
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f'device: {name!r} is not a torch device ({exc}); use "cpu", "cuda" or "cuda:N"'
        ) from None
    if device.type == "cuda":
        build = f"torch {torch.__version__}, " + (
            f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        )
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device: {name!r}, but torch finds no usable CUDA GPU here ({build}); set "
                'device = "cpu" in config.toml, or install a CUDA build of torch'
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {name!r}, but this machine has {torch.cuda.device_count()} CUDA "
                f"device(s), numbered from 0; choose one of them"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f'device: {name!r}, but Apple\'s MPS is not available here; set device = "cpu"'
        )
    elif device.type not in ("cpu", "cuda", "mps"):
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as exc:
            raise ConfigError(f"device: {name!r} is not usable here ({exc})") from None
    return name


def _missing_members(obj: object) -> list[str]:
    missing = [m for m in TASK_METHODS if not callable(getattr(obj, m, None))]
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        missing.insert(0, "name (a non-empty str attribute)")
    return missing


def _import_module(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise ConfigError(
                f"task {spec!r}: module {module_name!r} not found; install the package that "
                "provides it, or add its directory to PYTHONPATH"
            ) from exc
        raise ConfigError(
            f"task {spec!r}: importing module {module_name!r} failed because it needs "
            f"module {missing!r}, which is not installed (pip install it)"
        ) from exc
    except Exception as exc:
        raise ConfigError(
            f"task {spec!r}: importing module {module_name!r} raised "
            f"{type(exc).__name__}: {exc}; fix the module"
        ) from exc


def load_task(spec: str) -> Task:
    """Import the task named by ``spec`` (``"package.module:object"``) and return it.

    ``object`` may be a dotted path inside the module (``"pkg.mod:Tasks.mnist"``). If it is a
    class, it is instantiated without arguments; if it is not itself a task but is callable,
    it is called without arguments (a factory). The result must have a non-empty ``name``
    and the methods ``build_model``, ``load_data``, ``train`` and ``evaluate``.

    Every failure raises :class:`~p2pfed.errors.ConfigError` saying what to fix.

    Example::

        >>> load_task("p2pfed.tasks.digits:task").name
        'p2pfed-digits-mlp-v1'
    """
    if not isinstance(spec, str) or not _SPEC_RE.fullmatch(spec):
        raise ConfigError(
            f'task must be "package.module:object" (e.g. "mytasks.mnist:task"), got {spec!r}'
        )
    module_name, _, attr_path = spec.partition(":")
    obj: Any = _import_module(module_name, spec)
    walked = module_name
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_"))
            listing = ", ".join(public[:20]) + (", ..." if len(public) > 20 else "")
            raise ConfigError(
                f"task {spec!r}: {walked!r} has no attribute {part!r} "
                f"(it has: {listing or 'nothing public'}); check the name after the colon"
            )
        obj = getattr(obj, part)
        walked = f"{walked}:{part}" if walked == module_name else f"{walked}.{part}"

    if isinstance(obj, type) or (callable(obj) and _missing_members(obj)):
        kind = "class" if isinstance(obj, type) else "factory"
        try:
            obj = obj()
        except Exception as exc:
            raise ConfigError(
                f"task {spec!r}: calling the {kind} {attr_path!r} without arguments raised "
                f"{type(exc).__name__}: {exc}; point the setting at a task object, or make "
                "the class/factory callable without arguments"
            ) from exc

    missing = _missing_members(obj)
    if missing:
        raise ConfigError(
            f"task {spec!r}: the object ({type(obj).__name__}) is not a task, it lacks "
            f"{', '.join(missing)}; a task needs name, {', '.join(TASK_METHODS)} "
            "(see the p2pfed.task module documentation)"
        )
    task: Task = obj
    return task
