"""One more Ray node for the local stack, joined to its head and bound to loopback only.

    python infra/local/ray_node.py --address 127.0.0.1:GCS_PORT --num-cpus 2 \\
        --object-store-memory 1000000000 --temp-dir /tmp/cbs-.../worker --node-manager-port N ...

It does what ``ray start --address ... --block`` does (start the node's raylet, object store
and agents, then block until SIGTERM, which stops them), because Ray 2.60's ``ray start
--address`` cannot join a head on 127.0.0.1 and stay there: with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Cloudburst's loopback default) it refuses to add a
node, and with ``1`` it replaces 127.0.0.1 by the machine's network address and its servers
listen on every interface. Started with that variable at 0 and node address 127.0.0.1, every
server of this node listens on 127.0.0.1 only, as the head's do.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HOST = "127.0.0.1"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="the head's GCS, 127.0.0.1:PORT")
    p.add_argument("--num-cpus", type=int, required=True)
    p.add_argument("--object-store-memory", type=int, required=True)
    p.add_argument("--temp-dir", required=True, help="this node's own temp dir (short)")
    for port in (
        "node-manager-port",
        "object-manager-port",
        "metrics-export-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
    ):
        p.add_argument(f"--{port}", type=int, required=True)
    args = p.parse_args(argv)
    if not args.address.startswith(f"{HOST}:"):
        p.error(f"--address must be the head's GCS on {HOST}, got {args.address!r}")
    # before Ray loads: loopback addresses are kept as they are, servers bind 127.0.0.1
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(
        gcs_address=args.address,
        node_ip_address=HOST,
        node_name=f"{HOST}-worker",
        num_cpus=args.num_cpus,
        num_gpus=0,
        object_store_memory=args.object_store_memory,
        temp_dir=args.temp_dir,
        node_manager_port=args.node_manager_port,
        object_manager_port=args.object_manager_port,
        metrics_export_port=args.metrics_export_port,
        dashboard_agent_listen_port=args.dashboard_agent_listen_port,
        metrics_agent_port=args.dashboard_agent_grpc_port,
        runtime_env_agent_port=args.runtime_env_agent_port,
    )
    # shutdown_at_exit: SIGTERM or exit stops every process of the node
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(f"ray node {node.node_id} joined {args.address} (temp dir {args.temp_dir})", flush=True)
    while True:
        time.sleep(1)
        dead = node.dead_processes()
        if dead:  # as `ray start --block`: one process gone takes the node down
            names = ", ".join(kind for kind, _ in dead)
            print(f"ray node: {names} exited; stopping the node", file=sys.stderr, flush=True)
            node.kill_all_processes(check_alive=False, allow_graceful=False)
            return 1


if __name__ == "__main__":
    sys.exit(main())
