"""The ``p2pfed`` command line.

Rules of this file: :func:`build_parser` builds one argparse parser; each subcommand is added
by its own ``add_<name>_parser(subparsers)`` function (listed in :data:`SUBCOMMANDS`) and
handled by its own ``cmd_<name>(args) -> int`` function, so a new subcommand is one new pair
of functions and one line in :data:`SUBCOMMANDS`. Handlers report user errors by raising a
:class:`~p2pfed.errors.P2pfedError` subclass; :func:`main` prints it as
``p2pfed: error: MESSAGE`` on stderr and exits 1, without a traceback. Ctrl-C exits 130.

Example::

    $ p2pfed init ~/.p2pfed
    $ p2pfed federation new lab -o ~/.p2pfed/federation.toml
    $ p2pfed id
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from p2pfed import __version__
from p2pfed.atomicfile import atomic_write_text
from p2pfed.config import (
    CONFIG_FILE_NAME,
    FEDERATION_FILE_NAME,
    HOME_ENV_VAR,
    default_config_text,
    default_node_dir,
)
from p2pfed.conformance import add_conformance_parser
from p2pfed.daemon import add_node_parser
from p2pfed.demo import add_demo_parser
from p2pfed.dp import DP_MODES, calibrate, check_budget, release_cost
from p2pfed.errors import ConfigError, fatal_message, main_error
from p2pfed.export import add_export_parser
from p2pfed.federation import (
    RECORD_LEVEL_DEFAULTS,
    Federation,
    ProtocolParams,
    load_federation,
    save_federation,
    task_model_fingerprint,
)
from p2pfed.identity import IDENTITY_FILE_NAME, NodeIdentity, load_identity, save_identity
from p2pfed.run import add_run_parser
from p2pfed.status import add_status_parser

__all__ = [
    "SUBCOMMANDS",
    "build_parser",
    "cmd_federation_new",
    "cmd_federation_show",
    "cmd_id",
    "cmd_init",
    "main",
]

# "type" of argparse's add_subparsers() result is private; Any keeps the signatures honest.
Subparsers = Any


def _node_dir(value: str | None) -> Path:
    return Path(value).expanduser() if value else default_node_dir()


def _out(*lines: str) -> None:
    for line in lines:
        print(line)


# --- init ------------------------------------------------------------------------------------


def add_init_parser(subparsers: Subparsers) -> None:
    """``p2pfed init [DIR] [--force]``."""
    p = subparsers.add_parser(
        "init",
        help="create a node directory with a new identity and a default config",
        description=(
            "Create the node directory (mode 0700) with a new identity key (identity.key, mode "
            "0600) and a commented default config.toml. An existing config.toml is kept."
        ),
    )
    p.add_argument(
        "dir",
        nargs="?",
        metavar="DIR",
        help=f"node directory (default: ${HOME_ENV_VAR}, else ~/.p2pfed)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing identity key (the node gets a new id)",
    )
    p.set_defaults(handler=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    """Create or complete a node directory."""
    directory = _node_dir(args.dir)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} exists and is not a directory; choose another DIR")
    created = not directory.exists()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if created:
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
    elif directory.stat().st_mode & 0o077:
        print(
            f"p2pfed: warning: {directory} is accessible by other users; "
            f"consider `chmod 700 {directory}`",
            file=sys.stderr,
        )

    key_path = directory / IDENTITY_FILE_NAME
    replaced = key_path.exists() or key_path.is_symlink()
    if replaced and not args.force:
        raise ConfigError(
            f"{key_path} already exists; refusing to replace this node's identity. Pass --force "
            "to replace it (the node's id would change: peers will see a new node)"
        )
    identity = NodeIdentity.generate()
    save_identity(key_path, identity)

    config_path = directory / CONFIG_FILE_NAME
    if config_path.exists():
        config_state = "kept existing"
    else:
        atomic_write_text(config_path, default_config_text(), mode=0o600)
        config_state = "written, all defaults"

    federation_path = directory / FEDERATION_FILE_NAME
    _out(
        f"Initialized node directory {directory}",
        f"  identity: {key_path} ({'replaced' if replaced else 'new'})",
        f"  config:   {config_path} ({config_state})",
        "",
        f"Node id:  {identity.node_id}",
        f"Short id: {identity.node_id.short}",
        "",
    )
    if federation_path.exists():
        _out(f"Federation file: {federation_path} (present)")
    else:
        _out(
            "Next steps:",
            "  1. Copy your federation's file (from its operator) to",
            f"       {federation_path}",
            "     or create a new federation:",
            f"       p2pfed federation new NAME -o {federation_path}",
            f"  2. Review {config_path} (bootstrap peers, task, ports).",
        )
    return 0


# --- id --------------------------------------------------------------------------------------


def add_id_parser(subparsers: Subparsers) -> None:
    """``p2pfed id [DIR] [--short]``."""
    p = subparsers.add_parser(
        "id",
        help="print the node id of a node directory",
        description="Print the node id of a node directory (from its identity.key).",
    )
    p.add_argument(
        "dir",
        nargs="?",
        metavar="DIR",
        help=f"node directory (default: ${HOME_ENV_VAR}, else ~/.p2pfed)",
    )
    p.add_argument("--short", action="store_true", help="print only the short form")
    p.set_defaults(handler=cmd_id)


def cmd_id(args: argparse.Namespace) -> int:
    """Print a node directory's node id."""
    identity = load_identity(_node_dir(args.dir) / IDENTITY_FILE_NAME)
    print(identity.node_id.short if args.short else str(identity.node_id))
    return 0


# --- federation ------------------------------------------------------------------------------


def add_federation_parser(subparsers: Subparsers) -> None:
    """``p2pfed federation {new,show}``."""
    p = subparsers.add_parser(
        "federation",
        help="create or inspect a federation file",
        description="Create or inspect federation files.",
    )
    sub = p.add_subparsers(dest="federation_command", metavar="COMMAND", required=True)

    new = sub.add_parser(
        "new",
        help="create a new federation file (random id and secret)",
        description=(
            "Create a new federation: a file with a random id and secret and the default "
            "protocol parameters. Copy it to every member node as <node dir>/federation.toml."
        ),
    )
    new.add_argument("name", metavar="NAME", help="federation name (1-63 of A-Z a-z 0-9 . _ -)")
    new.add_argument(
        "-o", "--output", metavar="FILE", help="file to write (default: ./NAME.federation.toml)"
    )
    new.add_argument("--force", action="store_true", help="overwrite an existing file")
    new.add_argument(
        "--task",
        metavar="MODULE:OBJ",
        help="record this task's model fingerprint: a node whose task builds another model "
        "layout refuses to start",
    )
    new.add_argument(
        "--set",
        dest="task_settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a task setting that shapes the model, with --task (repeatable)",
    )
    privacy = new.add_argument_group(
        "differential privacy",
        "The noise is calibrated with the RDP accountant so that --rounds rounds spend at "
        "most --epsilon at --delta (spec/privacy.md). Record level also sets "
        f"server_optimizer = {RECORD_LEVEL_DEFAULTS['server_optimizer']} (momentum "
        f"{RECORD_LEVEL_DEFAULTS['server_momentum']:g}), which carries the few clipped DP-SGD "
        "steps across rounds; edit the file to change it.",
    )
    privacy.add_argument(
        "--dp",
        choices=DP_MODES,
        default="record",
        help="record: DP-SGD protects each record of a node's data (default); node: each "
        "round's update is noised to protect a node's whole dataset (needs many nodes to "
        "learn); distributed: as node, but each group member adds only a share of the "
        "noise, in the secure-aggregation ring; off: no differential privacy",
    )
    privacy.add_argument(
        "--epsilon", type=float, default=8.0, metavar="E", help="privacy budget (default 8)"
    )
    privacy.add_argument(
        "--delta", type=float, default=1e-5, metavar="D", help="delta (default 1e-5)"
    )
    privacy.add_argument(
        "--rounds",
        type=int,
        default=100,
        metavar="R",
        help="expected number of training rounds the budget must last (default 100)",
    )
    privacy.add_argument(
        "--sample-rate",
        type=float,
        metavar="Q",
        help="record level: probability that a record joins a DP-SGD batch (default "
        f"{RECORD_LEVEL_DEFAULTS['dp_sample_rate']:g})",
    )
    privacy.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help=f"record level: DP-SGD steps per round (default {RECORD_LEVEL_DEFAULTS['dp_steps']})",
    )
    privacy.add_argument(
        "--clip-norm",
        type=float,
        default=ProtocolParams.dp_clip_norm,
        metavar="C",
        help="L2 clip norm: of each record's gradient (record) or of the round's update "
        f"(node) (default {ProtocolParams.dp_clip_norm:g})",
    )
    new.set_defaults(handler=cmd_federation_new)

    show = sub.add_parser(
        "show",
        help="print a federation file's name, id, tag and parameters (never its secret)",
        description="Print a federation file's name, id, tag and parameters (never its secret).",
    )
    show.add_argument("file", metavar="FILE", help="federation file")
    show.set_defaults(handler=cmd_federation_show)


def _privacy_params(args: argparse.Namespace) -> tuple[ProtocolParams, str]:
    """The DP parameters ``federation new`` was asked for, calibrated, and a summary line."""
    if args.dp == "off":
        return ProtocolParams(dp_enabled=False), "differential privacy: OFF"
    level = args.dp
    chosen: dict[str, Any] = dict(RECORD_LEVEL_DEFAULTS) if level == "record" else {}
    if args.sample_rate is not None:
        chosen["dp_sample_rate"] = args.sample_rate
    if args.steps is not None:
        chosen["dp_steps"] = args.steps
    try:
        base = ProtocolParams(
            dp_level=level,
            dp_delta=args.delta,
            dp_epsilon_budget=args.epsilon,
            dp_clip_norm=args.clip_norm,
            **chosen,
        )
    except ConfigError as exc:
        raise ConfigError(f"{exc} (check --epsilon, --delta, --sample-rate, --steps)") from None
    sigma = calibrate(
        level,
        epsilon=base.dp_epsilon_budget,
        delta=base.dp_delta,
        rounds=args.rounds,
        sampling_rate=base.dp_sample_rate,
        steps=base.dp_steps,
    )
    params = dataclasses.replace(base, dp_noise_multiplier=sigma)
    if level == "distributed":
        # imported here: skellam loads torch (seconds), which no other subcommand of this
        # module needs before it runs (`p2pfed status` would wait for it on every call)
        from p2pfed.skellam import required_clip

        # the group sum's noise needs headroom in the fixed-point range
        needed = required_clip(params.dp_clip_norm, sigma, params.group_min)
        params = dataclasses.replace(params, clip=max(params.clip, needed))
    check_budget(params)
    cost = release_cost(params)
    spent = cost.epsilon(args.rounds, params.dp_delta)
    what = (
        f"DP-SGD: {params.dp_steps} steps a round, each on a Poisson sample of "
        f"{params.dp_sample_rate:g} of the node's records, each record's gradient clipped to "
        f"{params.dp_clip_norm:g}; server optimiser {params.server_optimizer}, momentum "
        f"{params.server_momentum:g}"
        if level == "record"
        else "each round's update clipped, each group member adding a share of the noise "
        f"(local epsilon {cost.epsilon(args.rounds, params.dp_delta, local=True):.3g} against "
        "members who strip the masks)"
        if level == "distributed"
        else "each round's update clipped and noised"
    )
    # one round's epsilon, so that an operator can tell what a round costs; RDP composes
    # sublinearly, so it is more than the total divided by the rounds
    summary = (
        f"differential privacy: {level} level ({what}); noise multiplier {sigma:g} gives "
        f"epsilon {cost.epsilon(1, params.dp_delta):.3g} per round and {spent:.3g} after "
        f"{args.rounds} rounds (budget {params.dp_epsilon_budget:g}, delta {params.dp_delta:g})"
    )
    return params, summary


def cmd_federation_new(args: argparse.Namespace) -> int:
    """Create a federation file."""
    # usage errors first: calibrating the DP noise can take seconds
    if args.task_settings and not args.task:
        raise ConfigError("--set shapes the model of --task: pass --task MODULE:OBJ too")
    params, privacy = _privacy_params(args)
    # validates the name before it becomes part of a path
    fed = Federation.new(args.name, params=params)
    if args.task:
        from p2pfed.daemon import parse_task_settings

        settings = parse_task_settings(args.task_settings)
        fingerprint = task_model_fingerprint(args.task, settings, fed)
        fed = dataclasses.replace(fed, model_fingerprint=fingerprint)
    path = Path(args.output).expanduser() if args.output else Path(f"{fed.name}.federation.toml")
    save_federation(path, fed, force=args.force)
    _out(
        f"Wrote federation {fed.name!r} to {path}",
        f"  id:  {fed.federation_id.hex()}",
        f"  tag: {fed.tag}",
        f"  {privacy}",
    )
    if fed.model_fingerprint is not None:
        _out(f"  model: {args.task}, fingerprint {fed.model_fingerprint.hex()}")
    print(
        f"WARNING: {path} contains the federation secret: anyone who has it can join the "
        "federation.\nCopy it only to member nodes (as <node dir>/federation.toml), over a "
        "channel you trust.",
        file=sys.stderr,
    )
    return 0


def cmd_federation_show(args: argparse.Namespace) -> int:
    """Describe a federation file without revealing its secret."""
    fed = load_federation(args.file)
    _out(
        f"name:             {fed.name}",
        f"id:               {fed.federation_id.hex()}",
        f"tag:              {fed.tag}",
        f"protocol version: {fed.protocol_version}",
    )
    if fed.model_fingerprint is not None:
        _out(f"model:            fingerprint {fed.model_fingerprint.hex()}")
    _out("params:")
    width = max(len(k) for k in fed.params.as_dict())
    for key, value in fed.params.as_dict().items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        print(f"  {key:<{width}} = {text}")
    return 0


# --- parser and entry point ------------------------------------------------------------------


def add_simnet_parser(subparsers: Subparsers) -> None:
    """``p2pfed simnet ...``, from the simulator package when it is installed: the node
    itself never imports simnet (simnet depends on the node, not the other way round)."""
    try:
        from simnet.cli import add_simnet_parser as add
    except ImportError:  # a node-only installation: no simulator subcommand
        return
    add(subparsers)


SUBCOMMANDS: list[Callable[[Subparsers], None]] = [
    add_init_parser,
    add_id_parser,
    add_federation_parser,
    add_status_parser,
    add_node_parser,
    add_run_parser,
    add_demo_parser,
    add_export_parser,
    add_conformance_parser,
    add_simnet_parser,
]
"""Functions adding one subcommand each, in help order."""


def build_parser() -> argparse.ArgumentParser:
    """The ``p2pfed`` argument parser with every subcommand of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="p2pfed",
        description="Serverless federated learning with secure aggregation and differential "
        "privacy.",
    )
    parser.add_argument("--version", action="version", version=f"p2pfed {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 error, 2 usage, 130 Ctrl-C)."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version and usage errors
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except BaseException as exc:  # every failure ends in one line
        return _report_failure(exc)


def _report_failure(error: BaseException) -> int:
    """Print one line ``p2pfed: error: WHAT (WHAT TO DO)`` for ``error`` and return the exit
    status; the traceback goes to the log at debug level (``--log-level DEBUG``).

    trio wraps an error escaping a task in an exception group per nursery it crosses: the
    error that explains the failure is picked out of them (:func:`main_error`).
    """
    chosen = main_error(error)
    if isinstance(chosen, KeyboardInterrupt):
        print("p2pfed: interrupted", file=sys.stderr)
        return 130
    if isinstance(chosen, SystemExit):
        return chosen.code if isinstance(chosen.code, int) else 1
    logging.getLogger("p2pfed.cli").debug("fatal error", exc_info=error)
    print(f"p2pfed: error: {fatal_message(chosen)}", file=sys.stderr)
    return 1
