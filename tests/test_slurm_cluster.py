"""Smoke tests of the SLURM test cluster itself (tests/slurm_cluster.py): each SLURM feature the
slurm/ scripts rely on, shown working on a real cluster before any test of those scripts uses it."""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

import pytest
import slurm_cluster as cluster_module
from slurm_cluster import SlurmCluster, SlurmError

pytestmark = pytest.mark.slurm


def batch_script(path: Path, body: str) -> Path:
    """A bash batch script; its #SBATCH lines, if any, go at the top of `body`."""
    path.write_text("#!/bin/bash\n" + body.lstrip("\n"))
    return path


def wait_for_text(path: Path, text: str, timeout: float = 30.0) -> str:
    """Wait until a file written by a running job holds `text` (jobs write markers as they go)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return path.read_text()
        time.sleep(0.2)
    raise AssertionError(f"{path} never held {text!r}: {path.read_text() if path.is_file() else '<missing>'}")


def test_a_wrap_job_completes_and_its_output_file_holds_what_it_echoed(slurm_cluster, tmp_path):
    job = slurm_cluster.sbatch(["--output", f"{tmp_path}/out-%j.txt", "--wrap", "echo hello from $SLURM_JOB_ID"],
                               cwd=tmp_path)
    (record,) = slurm_cluster.wait(job, timeout=30)
    assert slurm_cluster.state(record) == "COMPLETED", record
    assert record["ExitCode"] == "0:0"
    assert slurm_cluster.output(record) == f"hello from {job}\n"
    assert Path(record["StdOut"]) == tmp_path / f"out-{job}.txt"


def test_each_array_task_runs_with_its_own_task_id(slurm_cluster, tmp_path):
    job = slurm_cluster.sbatch(["--array=0-2", "--output", f"{tmp_path}/out-%A_%a.txt",
                                "--wrap", "echo task=$SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_JOB_ID"], cwd=tmp_path)
    records = slurm_cluster.wait(job, timeout=45)
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1", "2"]
    assert {slurm_cluster.state(r) for r in records} == {"COMPLETED"}
    for task in range(3):
        assert slurm_cluster.output(f"{job}_{task}") == f"task={task} of {job}\n"


def test_an_afterany_dependency_runs_only_after_the_whole_array(slurm_cluster, tmp_path):
    array = slurm_cluster.sbatch(["--array=0-2", "--output", f"{tmp_path}/array-%a.txt",
                                  "--wrap", "sleep 2; touch done.$SLURM_ARRAY_TASK_ID"], cwd=tmp_path)
    after = slurm_cluster.sbatch([f"--dependency=afterany:{array}", "--output", f"{tmp_path}/after.txt",
                                  "--wrap", "ls done.* | wc -l"], cwd=tmp_path)
    (record,) = slurm_cluster.wait(after, timeout=60)
    tasks = slurm_cluster.wait(array, timeout=5)
    assert slurm_cluster.state(record) == "COMPLETED", record
    assert slurm_cluster.output(record).strip() == "3"  # every array task had finished when it started
    assert record["StartTime"] >= max(task["EndTime"] for task in tasks)  # ISO times sort as text


def test_a_two_node_job_runs_one_task_per_node_with_nodeid_0_and_1(slurm_cluster_2nodes, tmp_path):
    job = slurm_cluster_2nodes.sbatch(["--nodes=2", "--ntasks-per-node=1", "--output", f"{tmp_path}/out.txt",
                                       "--wrap", "srun sh -c 'echo node=$SLURM_NODEID name=$SLURMD_NODENAME'"],
                                      cwd=tmp_path)
    (record,) = slurm_cluster_2nodes.wait(job, timeout=45)
    assert slurm_cluster_2nodes.state(record) == "COMPLETED", record
    lines = sorted(slurm_cluster_2nodes.output(record).splitlines())
    assert lines == ["node=0 name=node1", "node=1 name=node2"]


def test_the_one_and_two_node_clusters_run_side_by_side(slurm_cluster, slurm_cluster_2nodes, tmp_path):
    assert slurm_cluster.conf != slurm_cluster_2nodes.conf
    for cluster, nodes in ((slurm_cluster, "1"), (slurm_cluster_2nodes, "2")):
        job = cluster.sbatch(["--output", f"{tmp_path}/%j-{nodes}.txt", "--wrap", "echo $SLURM_JOB_NUM_NODES"],
                             cwd=tmp_path)
        (record,) = cluster.wait(job, timeout=30)
        assert cluster.output(record) == "1\n"
        assert cluster.run(["sinfo", "-h", "-o", "%D"]).stdout.strip() == nodes


def test_port_picks_do_not_follow_the_global_random_seed():
    # train() in a test process calls set_seed(0); two pytest workers that did so must still pick different ports.
    random.seed(0)
    first = cluster_module.free_ports(3)
    random.seed(0)
    assert cluster_module.free_ports(3) != first


def _ports_with_the_first_taken(squatter: socket.socket, calls: list[int], taken_calls: int):
    """A free_ports whose first `taken_calls` answers begin with the squatter's port: the daemon
    that gets it finds it bound, as when another process takes a port between pick and bind."""
    real = cluster_module.free_ports

    def pick(count: int) -> list[int]:
        calls.append(count)
        ports = real(count)
        return [squatter.getsockname()[1], *ports[1:]] if len(calls) <= taken_calls else ports
    return pick


@pytest.fixture
def squatter():
    """A port bound by this process (not listening: a client of the cluster then fails at once)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("0.0.0.0", cluster_module.free_ports(1)[0]))
    yield sock
    sock.close()


def test_a_port_taken_before_slurmctld_binds_it_costs_one_more_start(slurm_cluster, squatter, tmp_path,
                                                                    tmp_path_factory, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(cluster_module, "free_ports", _ports_with_the_first_taken(squatter, calls, taken_calls=1))
    root = tmp_path_factory.mktemp("port")  # short: slurmstepd's socket path under it must fit in 108 bytes
    cluster = SlurmCluster(root)
    cluster.start(timeout=60)
    try:
        assert calls == [2, 2]
        assert "Address already in use" in (root / "log.attempt-1" / "slurmctld.log").read_text()
        assert f"SlurmctldPort={squatter.getsockname()[1]}\n" not in cluster.conf.read_text()
        job = cluster.sbatch(["--output", f"{tmp_path}/out.txt", "--wrap", "echo up"], cwd=tmp_path)
        (record,) = cluster.wait(job, timeout=30)
        assert cluster.output(record) == "up\n"
        # Stopped and started again, with a port taken again: the earlier attempt's logs stay where they are.
        cluster.stop()
        monkeypatch.setattr(cluster_module, "free_ports", _ports_with_the_first_taken(squatter, [], taken_calls=1))
        cluster.start(timeout=60)
        assert sorted(p.name for p in root.glob("log*")) == ["log", "log.attempt-1", "log.attempt-2"]
    finally:
        cluster.stop()


def test_a_port_taken_at_every_attempt_fails_naming_it_and_leaves_no_daemon(slurm_cluster, squatter, tmp_path,
                                                                            monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(cluster_module, "free_ports", _ports_with_the_first_taken(squatter, calls, taken_calls=99))
    cluster = SlurmCluster(tmp_path / "cluster")
    with pytest.raises(SlurmError, match="Address already in use"):
        cluster.start(timeout=60)
    assert len(calls) == cluster_module.START_ATTEMPTS
    assert sorted(p.name for p in (tmp_path / "cluster").glob("log*")) == ["log", "log.attempt-1", "log.attempt-2"]
    assert _processes_naming(tmp_path / "cluster") == []  # every daemon's command line names its root


def _processes_naming(root: Path) -> list[str]:
    """The command lines of running processes that mention `root`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended while we looked
            continue
        if str(root) in text:
            found.append(text)
    return found


SIGNAL_TRAP = """
trap 'echo "USR1 at $SECONDS s" >> {marker}; kill $child; exit 0' USR1
echo started >> {marker}
sleep 300 &
child=$!
wait $child
echo "no signal" >> {marker}
"""


def test_scancel_signal_reaches_the_batch_shell_trap(slurm_cluster, tmp_path):
    """The fast form of the pre-time-limit signal: `scancel --signal=USR1 --batch` hits only the
    batch shell, whose trap runs while it waits on a background child."""
    marker = tmp_path / "marker"
    script = batch_script(tmp_path / "trap.sh", SIGNAL_TRAP.format(marker=marker))
    job = slurm_cluster.sbatch(["--output", f"{tmp_path}/out.txt", str(script)], cwd=tmp_path)
    wait_for_text(marker, "started")
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    (record,) = slurm_cluster.wait(job, timeout=30)
    assert slurm_cluster.state(record) == "COMPLETED", record
    assert "USR1 at" in marker.read_text() and "no signal" not in marker.read_text()


def test_sbatch_signal_b_usr1_before_the_time_limit_reaches_the_trap(slurm_cluster, tmp_path):
    """`#SBATCH --signal=B:USR1@55 --time=1`: slurmctld sends USR1 to the batch shell once fewer
    than 55 s remain (its time check runs about every 30 s, so this takes 5 to ~35 s)."""
    marker = tmp_path / "marker"
    script = batch_script(tmp_path / "trap.sh", "#SBATCH --signal=B:USR1@55\n#SBATCH --time=1\n"
                          + SIGNAL_TRAP.format(marker=marker))
    job = slurm_cluster.sbatch(["--output", f"{tmp_path}/out.txt", str(script)], cwd=tmp_path)
    (record,) = slurm_cluster.wait(job, timeout=90)
    assert slurm_cluster.state(record) == "COMPLETED", (record, marker.read_text())
    assert "USR1 at" in marker.read_text() and "no signal" not in marker.read_text()


def test_a_requeued_job_runs_again_with_restart_count_1(slurm_cluster, tmp_path):
    marker = tmp_path / "runs"
    script = batch_script(tmp_path / "requeue.sh", f"""
echo "run ${{SLURM_RESTART_COUNT:-0}}" >> {marker}
if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then sleep 300 & wait $!; fi
""")
    job = slurm_cluster.sbatch(["--open-mode=append", "--output", f"{tmp_path}/out.txt", str(script)], cwd=tmp_path)
    wait_for_text(marker, "run 0")
    slurm_cluster.run(["scontrol", "requeue", job])
    (record,) = slurm_cluster.wait(job, timeout=60)  # held for cred_expire (10 s) before it restarts
    assert slurm_cluster.state(record) == "COMPLETED", record
    assert marker.read_text() == "run 0\nrun 1\n"
    assert record["Restarts"] == "1"
