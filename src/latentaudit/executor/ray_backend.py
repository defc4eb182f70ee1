"""Units on Ray actors: each actor keeps its model loaded between units and holds the GPUs it
was given (``executor.gpus_per_worker``); the driver sends a unit to an idle actor, preferring
one that already holds that unit's model, and replaces an actor that dies.

Every node of a cluster needs latentaudit (same version) and the model's files: a worker loads
the model from its spec as the driver would.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ..errors import UserError
from .driver import Failure, WorkerLost
from .units import Result, Task, Unit

# tests: the worker running this unit dies once, after computing it and before its result
# reaches the driver (the marker file makes "once" hold across restarted workers)
FAULT_UNIT = "LATENTAUDIT_FAULT_KILL_UNIT"
FAULT_ONCE = "LATENTAUDIT_FAULT_KILL_ONCE"


class _Worker:
    """The actor's body (wrapped by ``ray.remote`` at run time, so importing this module does
    not need Ray)."""

    def __init__(self) -> None:
        self.held: dict[tuple, Any] = {}

    def run(self, task: Task) -> Result | Failure:
        from ..judges.base import JudgeError
        from ..pipeline import quiet_libraries
        from .units import run_task
        from .worker import held_model

        quiet_libraries()
        try:
            res = run_task(task, held_model(self.held, task.cfg))
        except (UserError, JudgeError) as e:
            return Failure(e)
        once = os.environ.get(FAULT_ONCE)
        if os.environ.get(FAULT_UNIT) == task.unit.id and once and not os.path.exists(once):
            open(once, "w").close()
            os._exit(137)
        return res


class RayBackend:
    """``executor: {kind: ray}``."""

    @staticmethod
    def check(ex) -> Callable[[], "RayBackend"]:
        """Ray importable and its cluster reachable, before any run folder is made; returns the
        backend's factory."""
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install 'latentaudit[ray]'") from None
        owns = not ray.is_initialized()
        if owns:
            try:
                ray.init(address=ex.address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = ex.address or "a local cluster"
                raise UserError(f"--executor ray: cannot start or reach {where}: "
                                f"{' '.join(str(e).split())[:200]}") from None
        return lambda: RayBackend(ex, owns)

    def __init__(self, ex, owns: bool = False) -> None:
        import ray

        self.ray, self.owns = ray, owns
        res = ray.cluster_resources()
        gpus = float(res.get("GPU", 0))
        self.gpus = ex.gpus_per_worker if ex.gpus_per_worker is not None else (1.0 if gpus else 0.0)
        n = ex.workers or (int(gpus // self.gpus) if self.gpus else 2)
        self.n = max(1, n)
        self.cpus = ex.cpus_per_worker
        self._cls = ray.remote(_Worker).options(num_gpus=self.gpus, num_cpus=self.cpus,
                                                max_restarts=0)
        self.actors = [self._cls.remote() for _ in range(self.n)]
        self.idle = list(range(self.n))
        self.model_of: dict[int, str] = {}  # actor -> the model it holds
        self.running: dict[Any, tuple[int, Unit]] = {}  # ObjectRef -> (actor, unit)

    def describe(self) -> str:
        g = f", {self.gpus:g} GPU each" if self.gpus else ""
        return f"Ray, {self.n} workers ({self.cpus:g} CPU{g})"

    def free(self) -> bool:
        return bool(self.idle)

    def busy(self) -> bool:
        return bool(self.running)

    def submit(self, unit: Unit, task: Task) -> None:
        spec = task.cfg.model
        # an actor that already holds this model, else one holding none, else any
        a = next((a for a in self.idle if self.model_of.get(a) == spec),
                 next((a for a in self.idle if a not in self.model_of), self.idle[0]))
        self.idle.remove(a)
        self.model_of[a] = spec
        self.running[self.actors[a].run.remote(task)] = (a, unit)

    def next(self) -> tuple[Unit, Result | Failure | WorkerLost]:
        ray = self.ray
        (ref,), _ = ray.wait(list(self.running), num_returns=1)
        a, unit = self.running.pop(ref)
        try:
            out = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.ObjectLostError) as e:
            # a fresh actor in its place; the unit goes back to the driver's queue
            ray.kill(self.actors[a], no_restart=True)
            self.actors[a] = self._cls.remote()
            self.model_of.pop(a, None)
            self.idle.append(a)
            return unit, WorkerLost(type(e).__name__)
        self.idle.append(a)
        return unit, out

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001 - an actor already gone
                pass
        self.actors = []
        if self.owns:  # the cluster this run started goes with it
            self.ray.shutdown()
