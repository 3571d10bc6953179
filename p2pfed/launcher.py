"""Start co-located node processes that share one import of torch and the node code.

A node process is mostly the libraries it imports: ``import torch`` alone makes ~190 MB
of resident memory, most of it private (relocated library data, the operator registry,
Python objects of the torch API). Sixteen nodes started with ``python -m p2pfed node``
each pay that again. A :class:`NodeLauncher` instead starts one *fork server*
(:mod:`multiprocessing`'s ``forkserver`` start method) that imports torch, the node and
the task once, freezes the garbage collector's view of those objects
(:func:`gc.freeze`, so collections in the children do not write to, and so un-share, the
inherited pages), and then forks every node from that warm image. Each node is still its
own process (its own keys, data, sockets and crash domain); only the read-mostly pages of
the imported code are shared copy-on-write. The server also imports what nodes would
otherwise import only once they run (:data:`WARM_MODULES`; above all TorchDynamo, which
the first ``torch.optim`` optimizer pulls in): 16 nodes importing it at once on 2 cores
delayed the first round by 7 s.

The fork server itself never runs a torch operation or a thread pool, which is what makes
forking it safe (forking after OpenMP or trio started threads is not).

Example::

    launcher = NodeLauncher(preload=["p2pfed.tasks.digits"])
    node = launcher.start(["node", "/tmp/n0", "--log-json"], stdout="n0.out", stderr="n0.log")
    ...
    node.terminate()      # SIGTERM: the node stops cleanly
    code = node.wait(60)  # exit status of ``p2pfed node``

On platforms without ``fork`` (Windows) the launcher falls back to one fresh interpreter
per node (``spawn``): correct, just without the sharing.
"""

from __future__ import annotations

import gc
import importlib
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "NODE_MODULES",
    "WARM_MODULES",
    "NodeLauncher",
    "NodeProcess",
    "freeze_imports",
    "preload",
]

# What every node imports before it can run; a task module is added by the caller.
NODE_MODULES = ("torch", "numpy", "trio", "p2pfed.cli", "p2pfed.daemon", "p2pfed.node")

# What a node imports only once it runs: found with ``python -X importtime`` on a node
# forked from a server that had preloaded NODE_MODULES and the task. The first use of
# ``torch.optim`` (constructing any optimizer) imports TorchDynamo: 816 modules, sympy
# among them, ~1.2 s of CPU and ~70 MB in every node, which 16 nodes on 2 cores paid at
# once in their first round (12 s of "training"). Imported once here, it is shared
# copy-on-write. The rest is small but free to share: numpy's random and masked-array
# modules, cryptography's OpenSSL backend (first handshake), the IDNA codec (first
# connection by name) and p2pfed's helpers of training and of the end of a round.
# Optional: a module missing from this torch release is skipped, never an error.
WARM_MODULES = (
    "torch._dynamo",
    "torch.profiler._cupti_monitor",
    "numpy.random",
    "numpy.ma",
    "cryptography.hazmat.backends.openssl",
    "encodings.idna",
    "p2pfed.proximal",
    "p2pfed.server_optimizer",
)


def preload(modules: Sequence[str] = (), *, warm: bool = False) -> None:
    """Import the node's modules and ``modules`` (no-ops where already imported).

    ``warm`` also imports :data:`WARM_MODULES`, skipping any that this installation lacks.
    """
    for name in (*NODE_MODULES, *modules):
        importlib.import_module(name)
    if warm:
        for name in WARM_MODULES:
            try:
                importlib.import_module(name)
            except ImportError:
                continue


def freeze_imports() -> None:
    """Move every object alive now out of the garbage collector's reach.

    Called once in the fork server after the preload: the children inherit a GC that never
    traverses (and so never writes the headers of) the imported modules' objects, which keeps
    those pages shared instead of copied into every node.
    """
    gc.collect()
    gc.freeze()


def _run_node(
    argv: list[str], stdout: str, stderr: str, modules: list[str], sys_path: list[str]
) -> None:
    """Body of a node process: detach, redirect output, run ``p2pfed ARGV``."""
    # A session of its own: Ctrl-C in the launcher's terminal is the launcher's to handle
    # (it stops the nodes with SIGTERM), as with ``start_new_session`` for a subprocess.
    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # The fork server kept the launcher's sys.path of the moment it started; entries added
    # since (a task's directory) must reach the node too.
    sys.path[:0] = [entry for entry in sys_path if entry not in sys.path]
    preload(modules)  # already imported under the fork server; imports them under spawn
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    from p2pfed.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: skip the atexit handlers and finalizers inherited from the fork server.
    os._exit(code)


class NodeProcess:
    """One node started by a :class:`NodeLauncher`; a small :class:`subprocess.Popen`-like face."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        pid = self._process.pid
        assert pid is not None
        return pid

    @property
    def returncode(self) -> int | None:
        """Exit status once the node has exited (negative: killed by that signal)."""
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        """Ask the node to stop cleanly (SIGTERM)."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the node to exit; raise :class:`TimeoutError` after ``timeout`` seconds."""
        self._process.join(timeout)
        code = self._process.exitcode
        if code is None:
            raise TimeoutError(f"node process {self.pid} still running after {timeout}s")
        return code


class NodeLauncher:
    """Starts ``p2pfed`` node processes from one fork server that preloaded torch.

    ``preload`` names extra modules to import up front, typically the task's module
    (``"p2pfed.tasks.digits"``): a module imported only in the nodes is not shared.
    :mod:`multiprocessing` keeps one fork server per launching process, started by the
    first :meth:`start`: a later launcher's ``preload`` only matters if it names the same
    modules (the nodes import anything missing themselves, unshared).
    """

    def __init__(self, preload: Sequence[str] = ()) -> None:
        self.modules = list(preload)
        forking = "forkserver" in multiprocessing.get_all_start_methods()
        self._context: Any = multiprocessing.get_context("forkserver" if forking else "spawn")
        if forking:
            # The server imports these in order (skipping any that fail to import); the
            # last one freezes what they created.
            self._context.set_forkserver_preload(
                [*NODE_MODULES, *WARM_MODULES, *self.modules, "p2pfed.forkserver_freeze"]
            )
        self._processes: list[NodeProcess] = []

    def start(self, argv: Sequence[str], *, stdout: str | Path, stderr: str | Path) -> NodeProcess:
        """Start ``p2pfed ARGV`` (e.g. ``["node", DIR, "--log-json"]``) in a new process.

        Its stdout and stderr are appended to the given files, created here if missing
        (so the caller can start reading them at once).
        """
        for path in (stdout, stderr):
            Path(path).touch()
        process = self._context.Process(
            target=_run_node,
            args=(list(argv), str(stdout), str(stderr), self.modules, list(sys.path)),
            daemon=False,
        )
        process.start()
        node = NodeProcess(process)
        self._processes.append(node)
        return node

    def stop_all(self, timeout: float = 60.0) -> None:
        """SIGTERM every running node, wait up to ``timeout`` s in all, then SIGKILL."""
        for node in self._processes:
            node.terminate()
        deadline = time.monotonic() + timeout
        for node in self._processes:
            try:
                node.wait(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                node.kill()
                node.wait()
