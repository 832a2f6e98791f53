"""The sandbox that runs model-written code, out of process.

* ``client.py``     ``Sandbox`` and ``SandboxResult``: the caller's API (``fit_predict``);
* ``processes.py``  the caller's side of the executor processes: start, share, stop;
* ``executor.py``   the warm executor, run as a script: serves requests, forks one child each;
* ``child.py``      what runs in the forked child: preloading, the program, its result;
* ``supervise.py``  the executor watching a child: wall clock, output caps, leftover processes;
* ``isolation.py``  entering the sandbox: rlimits, namespaces, uid, working directory;
* ``seccomp.py``    the seccomp filter (plain ctypes);
* ``cgroup.py``     one cgroup per execution;
* ``wire.py``       the message format between caller, executor and child (no pickle).

Standard library and numpy only: the executor runs these files as plain modules (not as a
package) and the caller must not import torch through them. The threat model is
docs/security.md.
"""

from .client import Sandbox, SandboxResult, default_preload

__all__ = ["Sandbox", "SandboxResult", "default_preload"]
