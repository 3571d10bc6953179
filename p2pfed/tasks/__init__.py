"""Built-in training tasks (see :mod:`p2pfed.task` for the task API).

* :mod:`p2pfed.tasks.digits`: the demo task, handwritten digits split non-IID across
  nodes (``task = "p2pfed.tasks.digits:task"``; needs ``pip install 'p2pfed[demo]'``).

Task modules import their heavy dependencies lazily, so importing this package is cheap.
"""
