"""Learner processes placed by Ray (``learners=N``): the run's N training processes as Ray actors, initialised
as torchrun initialises them, so every method runs unchanged, on one machine or across a cluster.

``alignkit <method> learners=N ...`` (``pip install 'alignkit[ray]'``) starts Ray (``ray.init()`` with this
machine's cores, or ``ray_address=auto`` / ``ray://host:port`` to join a cluster), reserves a placement group of
N bundles of ``learner_cpus`` CPUs and ``learner_gpus`` GPUs each (``placement=pack`` keeps them on as few nodes
as possible, ``spread`` puts them on different nodes), and starts one learner actor in each bundle. The first
learner's node is the rendezvous (``MASTER_ADDR``, a free port there); each learner gets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` (its index among the learners of its node) and ``LOCAL_WORLD_SIZE`` as torchrun
would set them, and then runs the method's recipe with the run's config: ``alignkit.train.dist.init`` joins the
process group (gloo on CPU, NCCL on GPU) exactly as under torchrun, and the strategy (DDP, FSDP2) follows. Ray
gives each learner its own GPUs (``CUDA_VISIBLE_DEVICES``), where ``LOCAL_RANK`` modulo the visible devices
picks the first.

The driver (this process) waits for the learners and prints the summary of rank 0. A learner that fails stops
the run: the others are killed (they would wait in their next collective for ever) and the error is raised here
as the learner raised it, so the exit codes are those of a one-process run (2 for bad input or config, 1 for a
diverged run). Ctrl-C or SIGTERM to the driver is passed on to the learners as SIGTERM, on the driver's node, so
they write their checkpoint and stop as a torchrun run does; learners on other nodes are killed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket

from alignkit.errors import ConfigError

log = logging.getLogger("alignkit")


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("learners=N places the training processes with Ray: pip install 'alignkit[ray]'") from None
    return ray


class Learner:
    """The body of one learner actor."""

    def where(self) -> tuple[str, int]:
        """This actor's node address and process id."""
        import ray

        return ray.util.get_node_ip_address(), os.getpid()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, module: str, cfg, env: dict[str, str]):
        """The recipe ``module`` on ``cfg`` as the process torchrun's ``env`` describes; rank 0's summary."""
        import importlib

        os.environ.update(env)
        os.environ["ALIGNKIT_RAY_LEARNER"] = "1"
        from alignkit.train import dist

        summary = importlib.import_module(module).run(cfg)
        main = dist.rank() == 0
        dist.finish()
        return summary if main else None


def rendezvous(nodes: list[str], port: int) -> list[dict[str, str]]:
    """torchrun's variables for learners on ``nodes`` (in rank order), the first one's node the master."""
    out = []
    for rank, node in enumerate(nodes):
        local = [i for i, n in enumerate(nodes) if n == node]
        out.append({"RANK": str(rank), "WORLD_SIZE": str(len(nodes)), "LOCAL_RANK": str(local.index(rank)),
                    "LOCAL_WORLD_SIZE": str(len(local)), "MASTER_ADDR": nodes[0], "MASTER_PORT": str(port)})
    return out


def launch(module: str, cfg):
    """Run the recipe ``module`` with ``cfg.learners`` learner actors (module docstring); rank 0's summary."""
    ray = _ray()
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    n = cfg.learners
    if not ray.is_initialized():
        if not cfg.ray_address:
            os.environ.setdefault("RAY_worker_niceness", "0")  # learners are the critical path
        ray.init(address=cfg.ray_address or None, include_dashboard=False, log_to_driver=True,
                 num_cpus=None if cfg.ray_address else max(n * cfg.learner_cpus, os.cpu_count() or 1))
    bundle = {"CPU": cfg.learner_cpus, **({"GPU": cfg.learner_gpus} if cfg.learner_gpus else {})}
    pg = placement_group([dict(bundle) for _ in range(n)], strategy=cfg.placement.upper())
    try:
        ray.get(pg.ready(), timeout=cfg.placement_timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ConfigError(f"learners={n}: Ray could not reserve {n} bundles of {bundle} ({cfg.placement}) within "
                          f"{cfg.placement_timeout:g} s; the cluster has {ray.cluster_resources()}") from None
    actor = ray.remote(Learner)
    learners = [actor.options(num_cpus=cfg.learner_cpus, num_gpus=cfg.learner_gpus,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
                .remote() for i in range(n)]
    try:
        where = ray.get([a.where.remote() for a in learners])
        envs = rendezvous([node for node, _ in where], ray.get(learners[0].free_port.remote()))
        log.info("learners=%d placed by Ray (%s): %s", n, cfg.placement,
                 ", ".join(f"rank {r} on {node} (pid {pid})" for r, (node, pid) in enumerate(where)))
        pending = {a.run.remote(module, cfg, env): r for r, (a, env) in enumerate(zip(learners, envs))}
        return _wait(ray, pending, learners, where)
    finally:
        for a in learners:
            ray.kill(a)
        remove_placement_group(pg)


def _wait(ray, pending: dict, learners: list, where: list):
    """Rank 0's result once every learner is done; the first failure raised as its learner raised it."""
    here = ray.util.get_node_ip_address()
    results: dict[int, object] = {}

    def forward(signum, frame):  # the learners checkpoint and stop, as under torchrun
        for node, pid in where:
            if node == here:
                os.kill(pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while pending:
            try:
                done, _ = ray.wait(list(pending), num_returns=1)
            except KeyboardInterrupt:
                forward(signal.SIGINT, None)
                continue  # their Stopped errors come back through the results
            ref = done[0]
            rank = pending.pop(ref)
            try:
                results[rank] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                raise e.cause if isinstance(e.cause, BaseException) else e from None
            except ray.exceptions.RayActorError as e:
                raise RuntimeError(f"learner {rank} died ({e}); the run stopped") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    return results.get(0)
