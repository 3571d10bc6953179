"""``p2pfed export``: a node's current model as a file any torch program can load.

A node keeps its model in ``checkpoint.bin`` (:mod:`p2pfed.checkpoint`): one flat float32
vector of the model's parameters, which only makes sense together with the task that
built the model. ``p2pfed export NODE_DIR -o FILE`` builds the task's model with the node's
settings (config.toml's ``[task]`` table, ``--set`` overrides), checks that the
checkpoint is of that model (same fingerprint), writes the checkpoint's parameters into
it and saves its ``state_dict``:

* ``FILE`` ending in ``.safetensors``: the safetensors format (needs ``pip install
  safetensors``; shared tensors are saved once, as ``safetensors.torch.save_model`` does);
  the checkpoint's round, the task and the fingerprint go into its metadata;
* any other name (``.pt`` by convention): ``torch.save`` of the ``state_dict``, loadable
  with ``torch.load(FILE, weights_only=True)``.

The model is built on the CPU whatever the node's ``device``. Buffers (BatchNorm running
statistics) are not in the checkpoint (they are never averaged): the file holds the values
``build_model`` gives them.

Loading it back::

    model = task.build_model(config)
    model.load_state_dict(torch.load("model.pt", weights_only=True))

Example::

    $ p2pfed export ~/.p2pfed -o model.pt
    wrote /home/me/model.pt: round 30 of p2pfed-digits-mlp-v1, 2410 parameters (torch state_dict)
"""

from __future__ import annotations

import argparse
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pfed.atomicfile import atomic_write_bytes
from p2pfed.config import CONFIG_FILE_NAME, load_config
from p2pfed.errors import ConfigError

__all__ = ["ExportResult", "add_export_parser", "cmd_export", "export_model"]

SAFETENSORS_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote."""

    path: Path
    format: str
    """``"torch"`` or ``"safetensors"``."""
    round: int
    """The checkpoint's round: how many rounds the model has been through."""
    parameters: int
    task: str


def add_export_parser(subparsers: Any) -> None:
    """``p2pfed export NODE_DIR -o FILE``."""
    p = subparsers.add_parser(
        "export",
        help="write a node's current model as a torch state_dict (.pt) or .safetensors file",
        description=(
            "Write the model of NODE_DIR's last checkpoint as a torch state_dict file "
            "(load it with model.load_state_dict(torch.load(FILE, weights_only=True))), or "
            "in the safetensors format when FILE ends in .safetensors. The model is built by "
            "the node's task with its [task] settings."
        ),
    )
    p.add_argument("dir", metavar="NODE_DIR", help="the node directory")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="file to write")
    p.add_argument("--task", metavar="MODULE:OBJ", help="the node's task, if not in config.toml")
    p.add_argument(
        "--set",
        dest="task_settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a task setting the node was started with (repeatable)",
    )
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from p2pfed.daemon import parse_task_settings

    output = Path(args.output).expanduser()
    if output.exists() and not args.force:
        raise ConfigError(f"{output} already exists; pass --force to overwrite it")
    result = export_model(
        Path(args.dir).expanduser(),
        output,
        task_spec=args.task,
        settings=parse_task_settings(args.task_settings),
    )
    kind = "torch state_dict" if result.format == "torch" else "safetensors"
    print(
        f"wrote {result.path}: round {result.round} of {result.task}, "
        f"{result.parameters} parameters ({kind})"
    )
    return 0


def export_model(
    node_dir: Path,
    output: Path,
    *,
    task_spec: str | None = None,
    settings: dict[str, Any] | None = None,
) -> ExportResult:
    """Write the model of ``node_dir``'s checkpoint to ``output`` (format from its suffix).

    Raises :class:`~p2pfed.errors.ConfigError` (or
    :class:`~p2pfed.errors.CheckpointError`) saying what to do when there is no task, no
    checkpoint, the checkpoint is of another model, or safetensors is missing.
    """
    safetensors = output.name.endswith(SAFETENSORS_SUFFIX)
    if safetensors and importlib.util.find_spec("safetensors") is None:
        raise ConfigError(
            f"writing {output.name} needs the safetensors package, which is not installed "
            "(pip install safetensors, or name the output .pt for a torch state_dict)"
        )
    config = load_config(node_dir)
    spec = task_spec or config.task
    if not spec:
        raise ConfigError(
            f"{node_dir / CONFIG_FILE_NAME} names no task; pass --task MODULE:OBJECT (the "
            "node's task)"
        )

    import torch

    from p2pfed.checkpoint import load_checkpoint
    from p2pfed.federation import load_federation
    from p2pfed.model_vector import model_fingerprint, num_parameters, vector_to_model
    from p2pfed.node import CHECKPOINT_FILE_NAME, federation_seed
    from p2pfed.task import load_task

    checkpoint_path = node_dir / CHECKPOINT_FILE_NAME
    checkpoint = load_checkpoint(checkpoint_path)
    if checkpoint is None:
        raise ConfigError(
            f"{node_dir} has no model yet (no {CHECKPOINT_FILE_NAME}): run the node until it "
            "completes a round, then export"
        )
    task = load_task(spec)
    task_config: dict[str, Any] = {**config.task_settings, **(settings or {})}
    task_config["device"] = "cpu"
    federation_path = config.federation_path(node_dir)
    if "seed" not in task_config and federation_path.exists():
        # the seed the node used, so that anything seeded besides the parameters matches
        task_config["seed"] = federation_seed(load_federation(federation_path))
    model = task.build_model(task_config)
    fingerprint = model_fingerprint(model, task.name)
    if fingerprint != checkpoint.fingerprint:
        raise ConfigError(
            f"{checkpoint_path} holds a different model than task {spec!r} builds with these "
            f"settings ({len(checkpoint.model)} values in the checkpoint, "
            f"{num_parameters(model)} parameters in the model): pass the --task and --set "
            "settings the node ran with"
        )
    vector_to_model(model, checkpoint.model)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    if safetensors:
        from safetensors.torch import save_model

        # save_model de-duplicates tied tensors, which save_file refuses; it writes the
        # file itself, so write next to the target and rename for atomicity
        partial = output.with_name(f".{output.name}.partial")
        save_model(
            model,
            str(partial),
            metadata={
                "format": "pt",
                "p2pfed_task": task.name,
                "p2pfed_round": str(checkpoint.round),
                "p2pfed_fingerprint": checkpoint.fingerprint.hex(),
            },
        )
        partial.replace(output)
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(output, buffer.getvalue(), mode=0o644)
    return ExportResult(
        path=output,
        format="safetensors" if safetensors else "torch",
        round=checkpoint.round,
        parameters=len(checkpoint.model),
        task=task.name,
    )
