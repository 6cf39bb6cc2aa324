"""A real, single-host SLURM cluster for the tests: munged, slurmctld and one slurmd per node.

Why a real cluster and not a mock: the SLURM scripts (slurm/*.sh) rely on behaviour that only
SLURM itself defines: job arrays, dependencies, requeue with SLURM_RESTART_COUNT, signals before
the time limit, SLURM_NODEID on a multi-node job. A fake would test our idea of SLURM instead.

Everything lives under one root folder (config, munge key and socket, state, spool, logs) and
every port is picked free at start, so two clusters (or one left over from a killed run) do not
clash; should another process take a port between the pick and the daemon's bind, start() tries
again with fresh ports. Daemons run in the foreground as our children, so `stop()` ends exactly
the processes this object started, by pid. They also get SIGTERM if the test process dies (setpriv --pdeathsig).

Needs root (slurmd launches jobs and SlurmUser is root) and Debian's slurmctld, slurmd,
slurm-client and munge packages (tests/install-slurm.sh).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun")
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
)
# Debian puts the daemons in /usr/sbin, which a non-login shell's PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
COMMAND_TIMEOUT = 30.0  # any single SLURM client call; a hung slurmctld must not hang the tests
START_ATTEMPTS = 3  # a start whose daemon found its port taken is retried with fresh ports
PORT_TAKEN = "Address already in use"
# Not the module-level generator: training code run in the test process seeds that one
# (accelerate's set_seed), so two pytest workers would draw the same "random" ports.
_port_picker = random.SystemRandom()
LOG_TAIL_LINES = 40


class SlurmError(RuntimeError):
    """A cluster that would not start, a client command that failed, or a job that did not finish."""


def missing_binaries() -> list[str]:
    """The SLURM/munge programs not found: the fixtures skip with this list instead of failing."""
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=SEARCH_PATH) is None]


def free_ports(count: int, low: int = 20000, high: int = 32000) -> list[int]:
    """Distinct ports that were free a moment ago, picked at random below Linux's ephemeral range
    (32768-60999): there, srun or any client's outgoing socket could take a port between our pick
    and the daemon's bind."""
    chosen: list[socket.socket] = []
    try:
        for port in _port_picker.sample(range(low, high), 200):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("0.0.0.0", port))  # the daemons listen on every address
            except OSError:
                sock.close()
                continue
            chosen.append(sock)
            if len(chosen) == count:
                return [sock.getsockname()[1] for sock in chosen]
        raise SlurmError(f"no {count} free ports in {low}-{high}")
    finally:
        for sock in chosen:
            sock.close()


def memory_mb() -> int:
    """90% of this host's memory, so jobs may ask for `--mem` (slurmd drains a node whose
    configured RealMemory exceeds what it finds)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 9 // 10 // 1024
    return 1024


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The end of a log file, for error messages; never raises."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as error:
        return f"<{path}: {error}>"
    return "\n".join(text[-lines:])


def parse_record(line: str) -> dict[str, str]:
    """One line of `scontrol show job -o`: `Key=value` pairs separated by spaces.

    A value may itself hold '=' (TRES=cpu=1,node=1) or spaces (Command=... args), so a new
    pair starts only at a space followed by a key-like word and '='."""
    record = {}
    for pair in re.split(r"\s+(?=[A-Za-z][\w/:]*=)", line.strip()):
        key, _, value = pair.partition("=")
        record[key] = value
    return record


def die_with_us(args: list[str]) -> list[str]:
    """Prefix a daemon's command with `setpriv --pdeathsig SIGTERM` (util-linux, always on Debian):
    the daemon gets SIGTERM when the test process dies, so a killed pytest leaves none behind.
    (Not a preexec_fn: Python code between fork and exec can deadlock in a threaded process.)"""
    setpriv = shutil.which("setpriv", path=SEARCH_PATH)
    if setpriv is None:
        log.debug("no setpriv: the SLURM daemons would outlive a killed test process")
        return args
    return [setpriv, "--pdeathsig", "SIGTERM", "--", *args]


class SlurmCluster:
    """A cluster of `nodes` emulated nodes (node1..nodeN), all on 127.0.0.1, rooted at `root`.

    Use as a context manager, or call start()/stop(). Client calls go through `.env`, which
    points SLURM_CONF at this cluster's slurm.conf."""

    def __init__(self, root: Path, nodes: int = 1, cluster_name: str = "advcap-test"):
        self.root = Path(root)
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.cluster_name = cluster_name
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.logs = self.root / "log"
        self.env = self._client_env()
        self._processes: list[tuple[str, subprocess.Popen]] = []

    # ----- lifecycle -----

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        """Write the config, start munged, slurmctld and the slurmds, and wait for idle nodes.

        A daemon that exits because its port was taken since the pick (another process bound it)
        costs one more try with fresh ports and its own `timeout`, up to START_ATTEMPTS; the earlier
        logs are kept beside (log.attempt-N). Any other failure, or the last attempt's, stops what
        was started and raises SlurmError with the daemon log tails."""
        if self._processes:
            raise SlurmError(f"cluster at {self.root} already started")
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._start_once(timeout)
                return
            except SlurmError as error:
                if attempt == START_ATTEMPTS or PORT_TAKEN not in str(error):
                    raise
                log.warning("SLURM cluster at %s: a port was taken before its daemon bound it; "
                            "trying again with fresh ports (attempt %d of %d)", self.root, attempt + 1, START_ATTEMPTS)
                self._set_logs_aside()

    def _set_logs_aside(self) -> None:
        """Move log/ to the first free log.attempt-N (a restarted cluster may have some already)."""
        attempt = 1
        while (self.root / f"log.attempt-{attempt}").exists():
            attempt += 1
        self.logs.rename(self.root / f"log.attempt-{attempt}")

    def _start_once(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        try:
            self._write_config()
            self._start_munged(deadline)
            self._start_slurmctld(deadline)
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-f", str(self.conf), "-N", node])
            self._wait_idle(deadline)
        except BaseException as error:
            report = self.diagnostics()
            self.stop()
            if isinstance(error, SlurmError):
                raise SlurmError(f"{error}\n{report}") from error
            raise
        log.info("SLURM cluster up at %s: %s", self.root, ", ".join(self.nodes))

    def stop(self) -> None:
        """End the jobs, then the daemons this object started (slurmds, slurmctld, munged), by pid.

        Jobs first: their slurmstepd processes are not our children and would outlive slurmd."""
        if self._alive("slurmctld"):
            self._end_all_jobs()
        for name, process in reversed(self._processes):
            self._terminate(name, process)
        self._processes.clear()

    # ----- client calls -----

    def run(self, args: list[str], cwd: Path | None = None, env: Mapping[str, str] | None = None,
            timeout: float = COMMAND_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster; on failure raise with its stderr."""
        full_env = {**self.env, **(env or {})}
        result = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def sbatch(self, args: list[str], cwd: Path | None = None, env: Mapping[str, str] | None = None) -> str:
        """Submit a job (`args` as on the sbatch command line) and return its id ("12")."""
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o <id>` parsed, for one job or one array task ("<array id>_<task id>").

        An id naming several records (a whole array) raises: use tasks() for those."""
        records = self.tasks(job_id)
        if len(records) != 1:
            raise SlurmError(f"job {job_id} has {len(records)} records (an array?): use tasks()")
        return records[0]

    def tasks(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job -o <id>` parsed: one dict per record. For an array, one per task
        that has started, plus one for the still-pending rest (e.g. ArrayTaskId=1-2)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return [parse_record(line) for line in out.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float = 60.0, poll: float = 0.5) -> list[dict[str, str]]:
        """Wait until every task of the job (or array) is in a final state; return the records.

        On timeout, raises with each task's state and reason and the daemon log tails."""
        return self._wait_for(job_id, lambda records: all(self.state(r) in FINAL_STATES for r in records),
                              "in a final state", timeout, poll)

    def wait_state(self, job_id: str, states: set[str], timeout: float = 60.0, poll: float = 0.5) -> dict[str, str]:
        """Wait until a single (non-array) job reaches one of `states` (e.g. {"RUNNING"})."""
        (record,) = self._wait_for(job_id, lambda records: self.state(records[0]) in states,
                                   f"in {'/'.join(sorted(states))}", timeout, poll)
        return record

    def _wait_for(self, job_id: str, done, what: str, timeout: float, poll: float) -> list[dict[str, str]]:
        """Poll tasks() until done(records). A failed or slow scontrol call is retried (a busy
        slurmctld on a loaded 2-core machine can time out once), except for an unknown job id."""
        deadline = time.monotonic() + timeout
        records: list[dict[str, str]] = []
        while True:
            try:
                records = self.tasks(job_id)
                if records and done(records):
                    return records
            except (SlurmError, subprocess.TimeoutExpired) as error:
                if "Invalid job id" in str(error):
                    raise
                log.warning("polling job %s: %s", job_id, error)
            if time.monotonic() > deadline:
                states = "; ".join(f"{self._task_name(r)}={r.get('JobState')} ({r.get('Reason')})" for r in records)
                raise SlurmError(f"job {job_id} not {what} after {timeout:.0f} s: {states}\n{self.diagnostics()}")
            time.sleep(poll)

    def output(self, job: str | dict[str, str], stream: str = "StdOut") -> str:
        """The text of a job's output file ("StdOut" or "StdErr"): pass a record from job()/wait()
        or a job id; an array task's id is "<array id>_<task id>"."""
        record = job if isinstance(job, dict) else self.job(job)
        path = Path(record[stream])
        if not path.is_file():
            raise SlurmError(f"job {record.get('JobId')}: no {stream} file {path} (is its folder missing?)")
        return path.read_text(errors="replace")

    @staticmethod
    def state(record: dict[str, str]) -> str:
        """The JobState without a suffix such as '+' (REQUEUED+ / CANCELLED by 0)."""
        return record.get("JobState", "").split()[0].rstrip("+")

    def diagnostics(self) -> str:
        """The tail of each daemon's log, for failure messages: its SLURM log file (timestamped),
        or for munged and for errors before the log file opens, its captured stderr."""
        parts = []
        for captured in sorted(self.logs.glob("*.out.log")):
            log_file = captured.with_name(captured.name.replace(".out.log", ".log"))
            path = log_file if log_file.is_file() else captured
            parts.append(f"--- {path} ---\n{tail(path)}")
        return "\n".join(parts) or f"<no logs in {self.logs}>"

    # ----- internals -----

    def _client_env(self) -> dict[str, str]:
        """os.environ with SLURM_CONF set and any inherited job variables removed, so tests run
        inside a real SLURM job (or with SBATCH_* defaults set) still talk to this cluster only."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = SEARCH_PATH
        return env

    def _write_config(self) -> None:
        """The munge key and a slurm.conf with fresh ports and every path under root."""
        for sub in ("munge", "state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(exist_ok=True)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, env=self.env,
                           capture_output=True, timeout=COMMAND_TIMEOUT)
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        self.conf.write_text(self._slurm_conf(ctld_port, node_ports))

    def _slurm_conf(self, ctld_port: int, node_ports: list[int]) -> str:
        """slurm.conf for a loopback cluster; the comments say why a setting is not the default."""
        root, host = self.root, socket.gethostname().split(".")[0]
        cpus, memory = os.cpu_count() or 1, memory_mb()
        node_lines = "\n".join(
            f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} CPUs={cpus} "
            f"RealMemory={memory} State=UNKNOWN"
            for node, port in zip(self.nodes, node_ports)
        )
        return f"""\
ClusterName={self.cluster_name}
# slurmctld accepts only a SlurmctldHost naming the host it runs on.
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
# Our own munged socket; cred_expire: a requeued job waits this long (default 120 s) to restart.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=bf_interval=1,sched_interval=2
# An unfittable job is rejected at submission instead of pending forever.
EnforcePartLimits=ALL
MailProg=/bin/true
# Finished jobs stay visible to `scontrol show job` for 10 minutes.
MinJobAge=600
KillWait=30
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        """Start a foreground daemon as our child, its stdout/stderr in log/<name>.out."""
        path = shutil.which(args[0], path=SEARCH_PATH)
        if path is None:
            raise SlurmError(f"{args[0]} not found on {SEARCH_PATH}")
        with open(self.logs / f"{name}.out.log", "ab") as out:
            process = subprocess.Popen(die_with_us([path, *args[1:]]), stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, env=self.env, cwd=self.root)
        self._processes.append((name, process))
        log.debug("started %s (pid %d)", name, process.pid)
        return process

    def _start_munged(self, deadline: float) -> None:
        """munged as root on our socket. --force: it refuses a socket under a folder that others
        cannot enter, and pytest's tmp folders are 0700; only root uses this socket anyway."""
        munge = self.root / "munge"
        self._spawn("munged", [
            "munged", "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={self.logs / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}",
        ])
        self._poll(deadline, "munged socket", lambda: self.munge_socket.is_socket())

    def _start_slurmctld(self, deadline: float) -> None:
        """slurmctld with a clean state (-c), then wait until it answers `scontrol ping`."""
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])

        def answers() -> bool:
            result = self.run(["scontrol", "ping"], check=False, timeout=10)
            return "is UP" in result.stdout

        self._poll(deadline, "slurmctld answering scontrol ping", answers)

    def _wait_idle(self, deadline: float) -> None:
        """Wait until sinfo shows every node idle (slurmd registered, ReturnToService=2)."""

        def all_idle() -> bool:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=10).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            return all(states.get(node) == "idle" for node in self.nodes)

        self._poll(deadline, "all nodes idle", all_idle)

    def _poll(self, deadline: float, what: str, ready, interval: float = 0.25) -> None:
        """Call ready() until true; fail early if a daemon died, or at the deadline.
        A client call that times out counts as not ready yet (a daemon still starting)."""
        while not self._ready(ready):
            dead = [f"{name} (exit {p.returncode})" for name, p in self._processes if p.poll() is not None]
            if dead:
                raise SlurmError(f"waiting for {what}: {', '.join(dead)} exited")
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out waiting for {what}")
            time.sleep(interval)

    @staticmethod
    def _ready(ready) -> bool:
        try:
            return ready()
        except subprocess.TimeoutExpired:
            return False

    def _alive(self, name: str) -> bool:
        return any(n == name and p.poll() is None for n, p in self._processes)

    def _end_all_jobs(self) -> None:
        """Cancel every job, then SIGKILL what still runs (KillWait is 30 s), and wait a little."""
        try:
            self.run(["scancel", "--full", "--user=root"], check=False, timeout=10)
            if not self._no_running_jobs(timeout=5):
                self.run(["scancel", "--full", "--signal=KILL", "--user=root"], check=False, timeout=10)
                if not self._no_running_jobs(timeout=10):
                    log.warning("SLURM jobs still running at stop; their processes may outlive the cluster")
        except (subprocess.TimeoutExpired, OSError) as error:
            log.warning("could not cancel the jobs before stopping: %s", error)

    def _no_running_jobs(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(["squeue", "-h", "-t", "RUNNING,COMPLETING,SUSPENDED", "-o", "%A"], check=False, timeout=10)
            if out.returncode == 0 and not out.stdout.strip():
                return True
            time.sleep(0.5)
        return False

    @staticmethod
    def _terminate(name: str, process: subprocess.Popen, grace: float = 15.0) -> None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL: only this pid, never by name."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", name, process.pid, grace)
                process.kill()
                process.wait(timeout=grace)
        log.debug("%s (pid %d) stopped, exit %s", name, process.pid, process.returncode)

    @staticmethod
    def _task_name(record: dict[str, str]) -> str:
        task = record.get("ArrayTaskId")
        return f"{record.get('ArrayJobId')}_{task}" if task else record.get("JobId", "?")
