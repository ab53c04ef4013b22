"""`--ray [ADDRESS|local]`: the same work as a local run, on Ray actors (batch, prefs, compare).

Ray Data `map_batches` runs the tasks (one row each) on a pool of actors. An actor builds
one engine from the picklable load options (options.LoadOptions: the bundle path and plain
values, never live objects), with as many threads as the CPUs Ray gave it, and calls the same work object a
local run calls (batch.BatchWork, export.prefs.PairWork) on each task. The driver appends
each result to the output the moment it arrives, so the output is resumable, and identical
to a local run's: every reply starts from empty KV caches with a seed that depends only on
(seed, prompt index, sample).

An error an actor meets on purpose (a missing bundle, a failing judge) comes back as a row
naming the node, and the driver raises it: the run fails, it does not hang.

Ray is imported only here, and only when --ray is given (the `ray` extra).
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import click

from .errors import BundleError, ConfigError, EdgeGenarmError
from .options import LoadOptions

INSTALL = "pip install 'edge-genarm[ray]'"
CONNECT_TIMEOUT_S = 25.0  # an address that does not answer fails within this (the issue asks 30 s)


# ---------------------------------------------------------------------------
# the command-line options
# ---------------------------------------------------------------------------


def ray_options(f):
    opts = [
        click.option(
            "--ray",
            "ray_address",
            metavar="ADDRESS|local",
            help="Run on Ray: 'local' starts a cluster on this machine; an address (host:port, "
            f"ray://host:port, auto) joins one. Needs {INSTALL}.",
        ),
        click.option(
            "--ray-actors",
            type=int,
            help="Engines (actors) in the pool (default: cluster CPUs / --ray-cpus-per-actor).",
        ),
        click.option(
            "--ray-cpus-per-actor", default=1, show_default=True, help="CPUs per actor: its engine's threads."
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def runner_from_options(o: dict, spec: LoadOptions) -> Callable | None:
    """A RayRunner when --ray was given, else None (run locally)."""
    if not o.get("ray_address"):
        return None
    return RayRunner(spec, o["ray_address"], o.get("ray_actors"), o.get("ray_cpus_per_actor") or 1)


# ---------------------------------------------------------------------------
# connecting
# ---------------------------------------------------------------------------


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError(f"--ray needs Ray (Ray Data), which is not installed: {INSTALL}") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of 'host:port' or 'ray://host:port'; None for 'auto' and other forms."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A TCP connection to the address, or a ConfigError naming it (ray.init itself can wait
    minutes for a head node that is not there)."""
    hp = _host_port(address)
    if hp is None:
        if address != "auto":
            raise ConfigError(
                f"Ray address {address!r} is not host:port, ray://host:port, auto or local: "
                "give the head node's address, e.g. --ray 10.0.0.5:6379"
            )
        return
    try:
        socket.create_connection(hp, timeout=timeout).close()
    except OSError as e:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address!r} ({e.strerror or type(e).__name__}): start it "
            "with `ray start --head` on that machine and check the address and firewall, or use --ray local"
        ) from None


def connect(address: str, num_cpus: int | None = None, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Start (address 'local') or join a Ray cluster; True when this call started one (the
    caller shuts it down). A Ray already initialized in this process is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR", configure_logging=True)
        return True
    check_reachable(address, timeout=min(10.0, timeout))
    done: dict = {}

    def join():
        try:
            ray.init(address=address, logging_level="ERROR")
            done["ok"] = True
        except Exception as e:  # reported below, in the caller's thread
            done["error"] = e

    t = threading.Thread(target=join, daemon=True)
    t.start()
    t.join(timeout)
    if "ok" in done:
        return False
    why = (
        f"{type(done['error']).__name__}: {done['error']}"
        if "error" in done
        else f"no answer in {timeout:.0f} s"
    )
    raise ConfigError(
        f"cannot join the Ray cluster at {address!r} ({str(why).splitlines()[0][:300]}): check that "
        "a Ray head runs there (`ray status` on it) with the same Ray and Python versions"
    )


def _quiet_ray_data(ray) -> None:
    import logging

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts records, not blocks
    ctx.max_consecutive_actor_init_deaths = 0
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---------------------------------------------------------------------------
# the actor
# ---------------------------------------------------------------------------


def node_name() -> str:
    try:
        import ray

        ip = ray.util.get_node_ip_address()
    except Exception:
        ip = "?"
    return f"{socket.gethostname()} ({ip})"


class EngineActor:
    """One engine per actor, built on the actor's node from the spec; maps task rows to
    result rows. An EdgeGenarmError becomes an error row for the driver to raise."""

    def __init__(self, spec: LoadOptions, work, cpus: int):
        self.work, self.engine, self.error = work, None, None
        try:
            where = Path(spec.weights)
            if not where.exists():
                raise BundleError(
                    f"on node {node_name()}: bundle '{where}' does not exist there; every node needs the "
                    "bundle at the same path: run `edge-genarm pack build` on each node, or put it in a "
                    "shared folder mounted at that path"
                )
            if spec.base is not None and not Path(spec.base).exists():
                raise BundleError(
                    f"on node {node_name()}: --base '{spec.base}' does not exist there; every node needs it "
                    "at the same path: put it in a shared folder mounted at that path"
                )
            import ray

            got = ray.get_runtime_context().get_assigned_resources().get("CPU") or cpus
            from dataclasses import replace

            from .loader import load

            self.engine = load(replace(spec, cores=max(1, int(got))))
            if hasattr(work, "setup"):
                work.setup(self.engine)
        except EdgeGenarmError as e:
            self.error = e if "on node" in str(e) else _renamed(e, f"on node {node_name()}: {e}")

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        out = []
        for task in batch["task"]:
            if self.error is not None:
                out.append(pickle.dumps(self.error))
                continue
            try:
                out.append(json.dumps(self.work(self.engine, json.loads(task)), ensure_ascii=False))
            except EdgeGenarmError as e:
                out.append(pickle.dumps(_renamed(e, f"{e} (on node {node_name()})")))
        return {"result": np.array(out, dtype=object)}


def _renamed(e: EdgeGenarmError, message: str) -> EdgeGenarmError:
    """`e`'s class with another message (EdgeGenarmError when that class wants other arguments)."""
    try:
        return type(e)(message)
    except Exception:
        return EdgeGenarmError(message)


# ---------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------


class RayRunner:
    """runner(work, tasks, on_result), as batch.local_runner, on a pool of Ray actors."""

    def __init__(self, spec: LoadOptions, address: str, actors: int | None = None, cpus_per_actor: int = 1):
        if cpus_per_actor < 1:
            raise ConfigError(f"--ray-cpus-per-actor must be at least 1, got {cpus_per_actor}")
        if actors is not None and actors < 1:
            raise ConfigError(f"--ray-actors must be at least 1, got {actors}")
        self.spec, self.address, self.actors, self.cpus = spec, address, actors, cpus_per_actor
        self.started = False
        import_ray()  # fail before any work when the extra is missing

    def start(self) -> None:
        """Start or join the cluster (run_batch calls this before its progress bar)."""
        local_cpus = (self.actors or 0) * self.cpus or os.cpu_count()
        self.started = connect(self.address, num_cpus=local_cpus) or self.started

    def pool_size(self, ray, n_tasks: int) -> int:
        cluster = int(ray.cluster_resources().get("CPU", 1))
        n = self.actors or max(1, cluster // self.cpus)
        if n * self.cpus > cluster:
            raise ConfigError(
                f"{n} actors x {self.cpus} CPUs need {n * self.cpus} CPUs, the Ray cluster has {cluster}: "
                "lower --ray-actors or --ray-cpus-per-actor"
            )
        return max(1, min(n, n_tasks))

    def __call__(self, work, tasks: list[dict], on_result: Callable[[dict], None]) -> None:
        ray = import_ray()
        self.start()
        try:
            _quiet_ray_data(ray)
            size = self.pool_size(ray, len(tasks))
            rows = [{"task": json.dumps(t, ensure_ascii=False)} for t in tasks]
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            ds = _map(ray, ds, dict(
                fn_constructor_kwargs={"spec": self.spec, "work": work, "cpus": self.cpus},
                batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=size),
                num_cpus=self.cpus,
            ))  # fmt: skip
            rows = iter(ds.iter_rows())
            try:
                for row in rows:
                    res = row["result"]
                    if isinstance(res, (bytes, bytearray)):
                        raise pickle.loads(res)
                    on_result(json.loads(res))
            finally:  # stop the pipeline now (its actors hold CPUs), not when the iterator is collected
                getattr(rows, "close", lambda: None)()
        except EdgeGenarmError:
            raise
        except ray.exceptions.RayError as e:
            raise EdgeGenarmError(f"the Ray run failed: {_first_line(e)}") from None
        finally:
            if self.started:
                ray.shutdown()
                self.started = False


def _map(ray, ds, kw: dict):
    """ds.map_batches(EngineActor) with actor restarts off: a crashed actor fails the run (a
    rerun resumes it) instead of retrying its task forever. Ray 2.60 takes max_restarts as a
    deprecated extra argument; a Ray that refuses it gets Ray's default."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ds.map_batches(EngineActor, max_restarts=0, **kw)
        except TypeError:
            return ds.map_batches(EngineActor, **kw)


def _first_line(e: Exception) -> str:
    lines = [x for x in str(e).splitlines() if x.strip()]
    hits = [x for x in lines if "Error" in x and "Traceback" not in x]
    return (hits[-1] if hits else lines[0] if lines else type(e).__name__).strip()[:400]
