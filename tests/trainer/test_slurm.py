"""scripts/slurm_train.sbatch without SLURM: a real torchrun under the script, scontrol stood in
for. What SLURM itself does (deliver --signal=B:USR1@600 to the batch shell, requeue) is not run
here."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainer_support import checkpoint_meta, cli_args, descendants, free_port, run_overrides

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm_train.sbatch"


SRUN = """#!/usr/bin/env bash
# stands in for srun: the command after srun's own --options once per node, each node's signals
# passed on as srun passes them; exits with the highest status
echo "$@" >> {log}
while [[ $1 == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
    SLURM_NODEID=$node "$@" &
    pids+=($!)
done
trap 'kill -s USR1 "${{pids[@]}}"' USR1
trap 'kill -s TERM "${{pids[@]}}"' TERM
status=0
for p in "${{pids[@]}}"; do
    while kill -0 "$p" 2>/dev/null; do wait "$p"; done
    wait "$p"
    s=$?
    ((s > status)) && status=$s
done
exit $status
"""


def _start(
    args: list[str], tmp_path: Path, job: str, nodes: int = 1, port: str | None = None
) -> subprocess.Popen:
    """The script as SLURM would start it: 2 GPUs (here gloo ranks on the CPU) per node; the
    master or rendezvous port ``port`` (default: a free one)."""
    port = port or free_port()
    scontrol = tmp_path / "scontrol"
    log = tmp_path / "scontrol.log"
    scontrol.write_text(
        f'#!/bin/sh\nif [ "$1" = show ]; then printf "localhost\\nlocalhost\\n"; exit; fi\n'
        f'echo "$@" >> {log}\n'
    )
    srun = tmp_path / "srun"
    srun.write_text(SRUN.format(log=tmp_path / "srun.log"))
    for stand_in in (scontrol, srun):
        stand_in.chmod(0o755)
    torchrun = f"{sys.executable} -m torch.distributed.run"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        # one node: torchrun's standalone master port; several: the c10d rendezvous port
        "TORCHRUN": torchrun if nodes > 1 else f"{torchrun} --master_port {port}",
        "KVPO_RDZV_PORT": port,
        "SCONTROL": str(scontrol),
        "SRUN": str(srun),
        "SLURM_JOB_ID": job,
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_GPUS_ON_NODE": str(2 // nodes),
    }
    return subprocess.Popen(
        ["bash", str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _signal_mid_run(
    job: subprocess.Popen, out: Path, sig: int, every: bool = False
) -> tuple[str, str]:
    """``sig`` to the batch script once the run is under way (``every``: to each process of the
    job, the script, torchrun and every rank, as SLURM signals a cancelled job's processes)."""
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)  # the first iteration is done: the ranks are mid-run
        for pid in [job.pid, *(descendants(job.pid) if every else [])]:
            os.kill(pid, sig)
        return job.communicate(timeout=180)
    finally:
        for pid in descendants(job.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        job.kill()


def _long_run(base, out: Path, **over) -> list[str]:
    """Command-line options of a run that goes on until a signal stops it (no evaluations)."""
    return cli_args(
        run_overrides(
            base,
            out,
            iterations=200,
            samples=False,
            save_every=1000,
            eval_before=False,
            eval_every=1000,
            device="cpu",
            **over,
        )
    )


def _iters(out: Path) -> list[int]:
    return [json.loads(x)["iter"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_time_limit_signal_stops_saves_and_requeues_and_the_job_goes_on(base, tmp_path):
    out = tmp_path / "run"
    args = _long_run(base, out, prompts_per_iter=4)
    job = _start(args, tmp_path, "4242")
    stdout, stderr = _signal_mid_run(job, out, signal.SIGUSR1)
    assert job.returncode == 0, stderr[-4000:]  # stopped in time and requeued: not a failure
    assert "stopped by SIGUSR1 after" in stdout and "requeueing job 4242" in stdout
    assert stderr.count("kvpo: got SIGUSR1") == 2  # each rank's own
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    done = int(checkpoint_meta(out / "checkpoint.safetensors")["iteration"])
    assert 1 <= done < 200 and _iters(out) == list(range(done))
    # the requeued job: the same command (here told to end 2 iterations later) goes on from there
    job = _start([*args, f"--iterations={done + 2}"], tmp_path, "4242")
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-4000:]
    assert f"resumed from {out / 'checkpoint.safetensors'} after {done} iterations" in stdout
    assert _iters(out) == list(range(done + 2))
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # not requeued again


def test_scancel_stops_with_a_checkpoint_and_is_not_requeued(base, tmp_path):
    """scancel: SIGTERM to every process of the job; each rank gets it straight and again from
    torchrun (which the script passes it to as well): one request, one checkpoint."""
    out = tmp_path / "run"
    job = _start(_long_run(base, out), tmp_path, "77")
    stdout, stderr = _signal_mid_run(job, out, signal.SIGTERM, every=True)
    assert job.returncode != 0 and "stopped by SIGTERM after" in stdout, stderr[-4000:]
    assert stderr.count("kvpo: got SIGTERM") == 2  # each rank's own, once
    assert int(checkpoint_meta(out / "checkpoint.safetensors")["iteration"]) >= 1
    assert not (tmp_path / "scontrol.log").exists()


def test_two_nodes_meet_stop_together_and_requeue(base, tmp_path):
    """--nodes=2: srun starts a torchrun per node (here two on this machine, one rank each), they
    meet by c10d rendezvous as one run of 2 ranks, and the time limit's SIGUSR1 to the script
    reaches both nodes' ranks through srun: one checkpoint, one requeue, and the job goes on."""
    out = tmp_path / "run"
    args = _long_run(base, out, prompts_per_iter=4)
    port = free_port()
    job = _start(args, tmp_path, "99", nodes=2, port=port)
    stdout, stderr = _signal_mid_run(job, out, signal.SIGUSR1)
    assert job.returncode == 0, stderr[-4000:]
    assert "stopped by SIGUSR1 after" in stdout and "requeueing job 99" in stdout
    assert stderr.count("kvpo: got SIGUSR1") == 2  # a rank on each node
    srun = (tmp_path / "srun.log").read_text()
    assert "--nnodes 2 --nproc_per_node 1 --rdzv_backend c10d" in srun
    assert f"--rdzv_endpoint localhost:{port} --rdzv_id 99" in srun
    assert (tmp_path / "scontrol.log").read_text() == "requeue 99\n"
    env = [json.loads(x) for x in (out / "environment.jsonl").read_text().splitlines()]
    assert [e["ranks"] for e in env] == [2]
    done = int(checkpoint_meta(out / "checkpoint.safetensors")["iteration"])
    job = _start([*args, f"--iterations={done + 1}"], tmp_path, "99", nodes=2)
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-4000:]
    assert f"after {done} iterations" in stdout and _iters(out) == list(range(done + 1))
