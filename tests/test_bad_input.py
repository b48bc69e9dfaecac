"""Bad input fails fast, in one line, before any work (issue 12's table), through the real CLI."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipelines.cli import main
from tests.study import write_study

REPO = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder nobody may create files in: root ignores mode bits, but not a read-only /sys."""
    if os.geteuid() == 0:
        return Path("/sys/taskatlas-not-writable")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_each_bad_input_exits_2_with_one_line_naming_it_and_no_traceback(tmp_path, capsys, monkeypatch):
    root = tmp_path / "runs"
    config = write_study(tmp_path / "tiny.yaml", root)
    bad_csv = tmp_path / "words.csv"
    bad_csv.write_text("target,sources,image_id,loss\nnormal,reshading,0,high\n")
    empty_csv = tmp_path / "header-only.csv"
    empty_csv.write_text("target,sources,image_id,loss\n")
    server = f"http://127.0.0.1:{_closed_port()}"
    read_only = _read_only_folder(tmp_path)
    run = ["run", "-c", str(config)]
    cases = {  # name: (arguments, extra environment, what the line must name)
        "tracking server down": ([*run, "--set", f"tracking_uri={server}"], {}, server),
        "storage root not writable": (
            [*run, "--set", f"storage_root={read_only / 'runs'}"],
            {},
            "storage_root",
        ),
        "data.n_test=0": ([*run, "--set", "data.n_test=0"], {}, "data.n_test"),
        "data.n_transfer=0": ([*run, "--set", "data.n_transfer=0"], {}, "data.n_transfer"),
        "train.num_workers=-1": ([*run, "--set", "train.num_workers=-1"], {}, "train.num_workers"),
        "TASKATLAS_RAY_NUM_CPUS=two": (run, {"TASKATLAS_RAY_NUM_CPUS": "two"}, "TASKATLAS_RAY_NUM_CPUS"),
        "transfer --tasks bogus": (["transfer", "-c", str(config), "--tasks", "bogus"], {}, "bogus"),
        "transfer.targets not among --tasks": (
            [
                "transfer",
                "-c",
                str(config),
                "--tasks",
                "normal,reshading",
                "--set",
                "transfer.targets=[edge_texture]",
            ],
            {},
            "transfer.targets",
        ),
        "transfer.targets not among tasks": (
            [*run, "--set", "transfer.targets=[depth_zbuffer]"],
            {},
            "transfer.targets",
        ),
        "affinity: non-numeric loss": (
            ["affinity", "--losses", str(bad_csv), "--out", str(tmp_path / "a.parquet")],
            {},
            str(bad_csv),
        ),
        "affinity: no rows": (
            ["affinity", "--losses", str(empty_csv), "--out", str(tmp_path / "b.parquet")],
            {},
            str(empty_csv),
        ),
    }

    def attempt(case):  # in this process: the same `main` a shell calls, without its start-up
        args, env, _ = cases[case]
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            start = time.monotonic()
            code = main(args)
            seconds = time.monotonic() - start
        return code, capsys.readouterr().err, seconds

    problems = []
    for case in cases:
        code, err, seconds = attempt(case)
        lines = err.strip().splitlines()
        named = cases[case][2]
        if code != 2 or len(lines) != 1 or named not in err:
            problems.append(f"{case}: exit {code}, stderr {err.strip()[-600:]!r}")
        elif seconds > 30:  # the tracking check gives up within 10 s; the rest need no waiting
            problems.append(f"{case}: took {seconds:.0f} s")
    # And once through a real process: exit status 2, one line, no traceback.
    args, _, named = cases["affinity: no rows"]
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    if done.returncode != 2 or len(done.stderr.strip().splitlines()) != 1 or named not in done.stderr:
        problems.append(f"a real process: exit {done.returncode}, stderr {done.stderr.strip()[-600:]!r}")
    assert not problems, "\n".join(problems)
    # Before any work: no dataset rendered, no MLflow store, no Ray session left a folder.
    assert not (root / "data").exists() and not (root / "mlflow.db").exists() and not (root / "ray").exists()


def test_a_resource_request_no_node_can_meet_is_one_line_not_a_wait_for_ever(tmp_path, capsys, ray_session):
    """Regression: taskonomy-gpu.yaml's `tune.cpus_per_trial: 4` on a 2-CPU machine made Ray wait
    for a 4-CPU node for ever, logging a warning a minute. A local cluster cannot grow: say so."""
    config = write_study(tmp_path / "big.yaml", tmp_path / "runs", train={"epochs": 1, "cpus_per_worker": 4})
    assert main(["run", "-c", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "train.cpus_per_worker" in err and "4 CPU" in err and "the largest: 2 CPU" in err, err


def test_fit_refusal_asks_one_node_for_all_of_a_request():
    from pipelines.ray_runtime import fit_refusal

    nodes = [{"CPU": 8.0}, {"CPU": 2.0, "GPU": 1.0}]
    assert fit_refusal({"CPU": 4, "GPU": 0}, nodes, "x") is None  # the first node
    assert fit_refusal({"CPU": 2, "GPU": 0.25}, nodes, "x") is None  # the second
    refused = fit_refusal({"CPU": 4, "GPU": 1}, nodes, "a trial")  # no single node has both
    assert (
        refused
        == "a trial asks for 4 CPU, 1 GPU on one node, and no node of this Ray cluster has that (the largest: 2 CPU, 1 GPU)"
    )
    assert fit_refusal({"CPU": 1}, [], "x") is not None
