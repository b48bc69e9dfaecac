"""Stage I on a two-node local cluster (`ray.cluster_utils.Cluster`), in its own process so it
does not disturb the session's Ray."""

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.cluster

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import pipelines  # keeps Ray on loopback (before Ray is imported)
    import ray
    from ray.cluster_utils import Cluster
    from components.data.shards import ShardStore
    from components.tasks import get_task
    from pipelines.config import load_pipeline_config
    from pipelines.invocation import open_tracker
    from pipelines.stage1.run import Stage1
    from pipelines.steps import unfenced

    root, dataset = sys.argv[1], sys.argv[2]
    # One CPU per node and two one-CPU workers: the worker group must span both nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    cfg = load_pipeline_config("configs/quickstart.yaml", [f"storage_root={root}", f"data.path={dataset}",
                               "train.epochs=2", "train.num_workers=2", "train.cpus_per_worker=1"])
    tracker = open_tracker(cfg)
    stage = Stage1(cfg, ShardStore(dataset), tracker, tracker.start_run("multinode"), unfenced)
    result = stage.train(get_task("edge_occlusion"), stage.plan.default_hparams())
    nodes = [float(tracker.client.get_run(result.run_id).data.tags["nodes"])]
    print("RESULT", json.dumps({"nodes": nodes, "alive": len([n for n in ray.nodes() if n["Alive"]]),
                                "test_loss": result.test_loss}))
    ray.shutdown()
    cluster.shutdown()
    """
)


@pytest.mark.slow
def test_training_spreads_over_two_nodes(tmp_path, tiny_dataset):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "runs"), str(tiny_dataset)],
        capture_output=True,
        text=True,
        timeout=420,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["alive"] == 2
    assert result["nodes"] and set(result["nodes"]) == {2.0}  # two nodes, one worker each
