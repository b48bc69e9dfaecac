"""`taskatlas affinity` and `taskatlas solve`, in-process through `pipelines.cli.main`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]
TASKONOMY_16K = ROOT / "tests" / "data" / "taskonomy" / "affinities_16k.csv"  # see its README.md
PNG = b"\x89PNG"


@pytest.fixture
def losses_file(tmp_path) -> Path:
    """A small per-image loss table: targets a, b, c; sources as list column, mixed orders."""
    rng = np.random.default_rng(0)
    candidates = {
        "a": [["self"], ["b"], ["c"], ["c", "b"], ["random"], ["pixels"]],
        "b": [["self"], ["a"], ["c"], ["random"], ["pixels"]],
        "c": [["self"], ["a"], ["b"], ["a", "b"]],
    }
    rows = [
        {"target": t, "sources": s, "image_id": f"img{i}", "loss": float(rng.random() + 0.1 * k)}
        for t, sets in candidates.items()
        for k, s in enumerate(sets)
        for i in range(25)
    ]
    path = tmp_path / "transfer_losses.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_affinity_then_solve_with_plot(losses_file, tmp_path, capsys):
    out, plot_dir = tmp_path / "affinity.parquet", tmp_path / "plots" / "heatmap.png"
    assert main(["affinity", "--losses", str(losses_file), "--out", str(out)]) == 0
    assert "3 targets" in capsys.readouterr().out
    assert out.with_suffix(".png").read_bytes()[:4] == PNG
    columns = ["target", "sources", "order", "affinity", "quality", "gain", "vs_random"]
    assert pq.read_table(out).column_names == columns
    as_csv = tmp_path / "affinity.csv"
    assert (
        main(["affinity", "--losses", str(losses_file), "--out", str(as_csv), "--heatmap", str(plot_dir)])
        == 0
    )
    assert "c,a+b,2," in as_csv.read_text()

    plot = tmp_path / "taxonomy.png"
    assert (
        main(["solve", "--affinities", str(out), "--budget", "1", "--max-order", "2", "--plot", str(plot)])
        == 0
    )
    text = capsys.readouterr().out
    assert "roots (1):" in text and "objective" in text and "affinity" in text
    assert plot.read_bytes()[:4] == PNG


def test_json_schema_on_taskonomy(capsys):
    args = ["solve", "--affinities", str(TASKONOMY_16K), "--budget", "3", "--max-order", "2", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"budget", "max_order", "objective", "roots", "transfers"}
    assert result["budget"] == 3 and result["max_order"] == 2
    assert result["roots"] == sorted(result["roots"]) and len(result["roots"]) == 3
    assert not set(result["transfers"]) & set(result["roots"])
    assert all(s == sorted(s) and set(s) <= set(result["roots"]) for s in result["transfers"].values())
    source_only = {"class_selected", "colorization", "impainting_whole", "jigsaw", "random"}
    assert len((set(result["transfers"]) | set(result["roots"])) - source_only) == 22  # every target covered


def test_every_budget_and_order_through_the_cli(tmp_path, capsys):
    for max_order in range(1, 6):
        args = [
            "solve",
            "--affinities",
            str(TASKONOMY_16K),
            "--max-order",
            str(max_order),
            "--sweep",
            "--json",
        ]
        assert main(args) == 0
        sweep = json.loads(capsys.readouterr().out)["sweep"]
        assert [p["budget"] for p in sweep] == list(range(1, 27))  # 26 tasks; `random` is a baseline
        assert all(p["objective"] is not None for p in sweep)
        assert all(len(p["roots"]) <= p["budget"] for p in sweep)


def test_sweep_table_and_plot(tmp_path, capsys):
    plot = tmp_path / "sweep.png"
    args = ["solve", "--affinities", str(TASKONOMY_16K), "--max-order", "1", "--sweep-plot", str(plot)]
    assert main([*args, "--exclude", "random,class_selected", "--cost", "denoise=30"]) == 0
    text = capsys.readouterr().out
    assert "budget  objective  roots" in text
    assert len([line for line in text.splitlines() if re.match(r"\s*\d+\s+\d", line)]) == 25  # 25 tasks left
    assert plot.read_bytes()[:4] == PNG


def test_options_reach_the_solver(capsys):
    base = ["solve", "--affinities", str(TASKONOMY_16K), "--budget", "2", "--max-order", "1", "--json"]
    assert main([*base, "--targets", "rgb2depth,edge2d", "--transform", "none"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["transfers"]) | set(result["roots"]) >= {"rgb2depth", "edge2d"}
    assert set(result["transfers"]) <= {"rgb2depth", "edge2d"}
    assert main([*base, "--source-only", "denoise", "--importance", "edge2d=10", "--cost", "edge2d=2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "denoise" not in result["transfers"]
    assert result["roots"] == ["edge2d"]  # the only root it can afford, and worth the most


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--importance", "rgb2depth=heavy"], "--importance rgb2depth: 'heavy' is not a number"),
        (["--importance", "rgb2depth"], "--importance: expected task=number"),
        (["--importance", "nosuchtask=2"], "importance: unknown task(s) nosuchtask"),
        (["--cost", "edge2d=-1"], "cost: edge2d=-1.0 must be"),
        (["--targets", "rgb2depth,nosuchtask"], "targets: unknown task(s) nosuchtask"),
        (["--targets", "jigsaw"], "jigsaw has no transfer into it"),
        (["--cost", "rgb2sfnorm=5,denoise=5", "--budget", "0"], "budget 0 is too small"),
    ],
)
def test_bad_requests_are_one_line_errors(extra, message, capsys):
    args = ["solve", "--affinities", str(TASKONOMY_16K), "--budget", "2", "--max-order", "1", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_inputs_are_errors(tmp_path, capsys):
    assert (
        main(["solve", "--affinities", str(tmp_path / "none.csv"), "--budget", "1", "--max-order", "1"]) == 2
    )
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "aff.csv").write_text("target,sources,order,value\na,self,1,0.5\na,b,1,0.3\n")
    assert main(["solve", "--affinities", str(tmp_path / "aff.csv"), "--max-order", "1"]) == 2
    assert "--budget is required" in capsys.readouterr().err
    assert (
        main(["solve", "--affinities", str(tmp_path / "aff.csv"), "--budget", "1", "--max-order", "1"]) == 0
    )
    assert "  a  <- self (root)  affinity 0.5" in capsys.readouterr().out


def test_subprocess_smoke(tmp_path):
    path = tmp_path / "aff.csv"
    path.write_text("target,sources,order,value\na,self,1,0.5\na,b,1,0.4\nb,self,1,0.5\nb,a+c,2,0.9\n")
    cmd = [sys.executable, "-m", "pipelines.cli", "solve", "--affinities", str(path), "--budget", "2"]
    done = subprocess.run(
        [*cmd, "--max-order", "2", "--json"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == {
        "budget": 2,
        "max_order": 2,
        "objective": pytest.approx(0.5**0.5 + 0.9**0.5),
        "roots": ["a", "c"],
        "transfers": {"b": ["a", "c"]},
    }
