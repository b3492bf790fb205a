"""Sandboxed execution of untrusted Python (code-task rewards run model output).

    from r1zero.sandbox import run_code
    run_code("print(sum(range(10)))", timeout_s=2.0, memory_mb=256).stdout   # '45\n'

See :mod:`r1zero.sandbox.runner` for how, ``docs/sandbox.md`` for what it can and cannot stop,
and ``r1zero sandbox run FILE.py`` for the command line.
"""

from r1zero.sandbox.runner import STATUSES, SandboxResult, plan, run_code

__all__ = ["STATUSES", "SandboxResult", "plan", "run_code"]
