"""`torchrun -m museum submit`: contiguous shards, one submission in input order, identical to one process."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack, nullcontext

import pytest

from csvrows import read_rows, write_rows
from museum.submit import SubmitSummary, _open_writers, _score_rows, prepare, shard_bounds


@pytest.mark.parametrize("n, world", [(0, 2), (1, 3), (5, 8), (10, 3), (1223, 2), (7, 7)])
def test_shards_are_contiguous_and_cover_every_row(n, world):
    bounds = [shard_bounds(n, world, rank) for rank in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 0


@pytest.fixture(scope="module")
def small_test_csv(tmp_path_factory, museum_test_csv):
    rows = read_rows(museum_test_csv)[:90]  # with and without descriptions
    return write_rows(tmp_path_factory.mktemp("t") / "test.csv", ["guid", "description"],
                      [[r["guid"], r["description"]] for r in rows])


@pytest.mark.parametrize("chunk_size", [1, 7, 45, 1000])
def test_shards_at_chunk_edges_join_to_the_whole(text_model_dir, small_test_csv, chunk_size, tmp_path):
    setup = prepare(small_test_csv, None, text_model_dir, None, {"device": "cpu"})
    whole_path, parts = tmp_path / "whole.csv", []

    def run(lo, hi, path):
        setup.config.chunk_size = chunk_size
        summary = SubmitSummary(out=path, proba_out=None)
        with ExitStack() as stack:
            writers = _open_writers(stack, setup, nullcontext(path), None, header=False)
            _score_rows(setup, small_test_csv, lo, hi, writers, summary, None, show=False)
        return summary.rows

    assert run(0, None, whole_path) == 90
    for rank in range(4):  # 90 rows over 4 ranks: shards of 22-23 rows, edges inside and at chunks
        lo, hi = shard_bounds(90, 4, rank)
        parts.append(tmp_path / f"part{rank}.csv")
        assert run(lo, hi, parts[-1]) == hi - lo
    assert b"".join(p.read_bytes() for p in parts) == whole_path.read_bytes()


def _torchrun(port: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
           "-m", "museum", "submit", *args, "--device", "cpu", "--chunk-size", "16"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_write_the_same_bytes_as_one(text_model_dir, small_test_csv, tmp_path, free_port):
    from typer.testing import CliRunner
    from museum.cli import app

    one = CliRunner().invoke(app, ["submit", str(small_test_csv), "--text-model", str(text_model_dir), "--image-model", "none",
                                   "--out", str(tmp_path / "one.csv"), "--proba", str(tmp_path / "one_p.csv"),
                                   "--chunk-size", "16", "--device", "cpu"])
    assert one.exit_code == 0, one.output
    done = _torchrun(free_port, str(small_test_csv), "--text-model", str(text_model_dir), "--image-model", "none",
                     "--out", str(tmp_path / "two.csv"), "--proba", str(tmp_path / "two_p.csv"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert (tmp_path / "two_p.csv").read_bytes() == (tmp_path / "one_p.csv").read_bytes()
    assert [line.split() for line in done.stdout.splitlines() if line.startswith("rows ")] == [["rows", "90"]]  # said once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv", "one_p.csv", "two.csv", "two_p.csv"]


def test_a_failing_rank_fails_the_run_in_one_line_and_writes_nothing(text_model_dir, small_test_csv, tmp_path, free_port):
    rows = read_rows(small_test_csv)
    rows[80] = dict(rows[80], guid=rows[10]["guid"])  # a duplicate only the second rank reads
    bad = write_rows(tmp_path / "bad.csv", ["guid", "description"], [[r["guid"], r["description"]] for r in rows])
    (tmp_path / "out.csv").write_text("earlier submission\n")
    done = _torchrun(free_port, str(bad), "--text-model", str(text_model_dir), "--image-model", "none",
                     "--out", str(tmp_path / "out.csv"))
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "duplicated guid" in errors[0] and "line 82" in errors[0], done.stderr[-2000:]
    assert (tmp_path / "out.csv").read_text() == "earlier submission\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "out.csv"]  # no part files left
