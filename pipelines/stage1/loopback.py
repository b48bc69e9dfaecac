"""Ray Train's torch.distributed rendezvous kept on loopback when the workers are on loopback.

Ray Train's own set-up has rank 0 start torch's `TCPStore` server, which listens on every
interface (`*:port`) whatever `MASTER_ADDR` says: a local run was reachable on the machine's LAN
address. Here rank 0 opens the listening socket itself, on 127.0.0.1, and hands it to the
`TCPStore` (`master_listen_fd`); every rank, rank 0 included, then joins it as a client
(`TORCHELASTIC_USE_AGENT_STORE`), and gloo binds to the loopback interface. Workers on a
routable address (a real cluster) get Ray's set-up unchanged.

    TorchTrainer(..., torch_config=LoopbackTorchConfig())
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
from ray.train.torch.config import TorchConfig

from pipelines.compat import RayTorchBackend as _RayTorchBackend
from pipelines.compat import set_torch_distributed_env_vars as _set_torch_distributed_env_vars
from pipelines.compat import setup_torch_process_group as _setup_torch_process_group

_STORE = None  # rank 0's TCPStore server: lives as long as the worker process


def _node_is_loopback() -> bool:
    return ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback


def _serve_store_on_loopback(world_size: int, timeout_s: int) -> int:
    """Rank 0: a TCPStore server on a socket bound to 127.0.0.1; returns its port."""
    import torch.distributed as dist

    global _STORE
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    _STORE = dist.TCPStore(
        "127.0.0.1",
        port,
        world_size,
        is_master=True,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
        multi_tenant=False,
        master_listen_fd=listener.detach(),
    )
    return port


def _join_store_on_loopback(port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",  # every rank a client of the store rank 0 serves
        GLOO_SOCKET_IFNAME="lo",
    )


class _LoopbackTorchBackend(_RayTorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        on_loopback = all(worker_group.execute(_node_is_loopback))
        if not on_loopback or backend_config.backend not in ("gloo", "nccl"):
            return super().on_start(worker_group, backend_config)
        port = worker_group.execute_single(
            0, _serve_store_on_loopback, world_size=len(worker_group), timeout_s=backend_config.timeout_s
        )
        worker_group.execute(_join_store_on_loopback, port=port)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get(
            [
                worker_group.execute_single_async(
                    i,
                    _setup_torch_process_group,
                    backend=backend_config.backend,
                    world_rank=i,
                    world_size=len(worker_group),
                    init_method="env://",
                    timeout_s=backend_config.timeout_s,
                )
                for i in range(len(worker_group))
            ]
        )


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """`TorchConfig` whose rendezvous listens on 127.0.0.1 when every worker is on loopback."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
