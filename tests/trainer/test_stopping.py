"""kvpo.run.stopping and the trainer under it: a stop signal saves and exits, `--resume auto`
continues where the run stopped, as if it had never stopped."""

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from trainer_support import checkpoint_meta, cli_args, descendants, free_port, run_overrides

from kvpo.run.config import build_config
from kvpo.run.stopping import StopSignals
from kvpo.trainer import main, train

ROOT = Path(__file__).resolve().parents[2]


def _saved_iteration(out: Path) -> int:
    return int(checkpoint_meta(out / "checkpoint.safetensors")["iteration"])


def _rows(out: Path) -> list[int]:
    return [json.loads(x)["iter"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_first_signal_is_a_request_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert stop.requested() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested() == "SIGUSR1"
        assert stop.requested(late=True) == "max_minutes"  # out of time outranks a signal
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL

    def elsewhere():  # Python takes signals in the main thread only: nothing is installed
        with StopSignals():
            assert signal.getsignal(signal.SIGTERM) is before

    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()


def _default_sigint() -> None:
    # A shell without job control starts background jobs with SIGINT ignored, and a Python
    # started so keeps it ignored instead of raising KeyboardInterrupt: start it as a terminal does.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` run by a fresh Python (signals sent to it cannot reach the test's process)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=_default_sigint,
    )


def test_a_second_signal_stops_at_once():
    """A second request stops at once; the same signal again within echo_s is the first one
    delivered twice (scancel signals torchrun and its ranks, and torchrun passes it on)."""
    code = (
        "import os, signal, time\n"
        "from kvpo.run.stopping import StopSignals\n"
        "with StopSignals(echo_s=0.5) as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"  # its echo: torchrun passing it on
        "    assert stop.requested() == 'SIGTERM'\n"
        "    print('asked', flush=True)\n"
        "    time.sleep(0.6)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "print('survived')\n"
    )
    res = _python(code)
    assert res.returncode == -signal.SIGTERM, res.stderr[-2000:]
    assert res.stdout == "asked\n" and "kvpo: got SIGTERM" in res.stderr


def test_an_echo_that_interrupts_the_handler_is_still_the_same_request():
    """Python runs a signal handler between bytecodes, the handler's own too: the echo of a
    request (a few microseconds behind it when scancel signals a rank and torchrun passes the
    signal on) can arrive anywhere in the handler of the first. Raised at each line of the
    handler in turn, it still makes one request, one message, and no stop at once."""
    code = (
        "import os, signal, sys\n"
        "from kvpo.run.stopping import StopSignals\n"
        "k = 0\n"
        "while True:\n"
        "    lines = 0\n"
        "    def trace(frame, event, arg):\n"
        "        global lines\n"
        "        if frame.f_code.co_name != '_handle':\n"
        "            return None\n"
        "        if event == 'line':\n"
        "            if lines == k:\n"
        "                signal.raise_signal(signal.SIGTERM)\n"  # the echo, at line k
        "            lines += 1\n"
        "        return trace\n"
        "    with StopSignals() as stop:\n"
        "        sys.settrace(trace)\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        sys.settrace(None)\n"
        "        assert stop.requested() == 'SIGTERM'\n"
        "    if lines <= k:\n"  # no line k: every line of the handler has had the echo
        "        break\n"
        "    k += 1\n"
        "print(k, flush=True)\n"
    )
    res = _python(code)
    assert res.returncode == 0, res.stderr[-2000:]
    trials = int(res.stdout) + 1
    assert trials > 3 and res.stderr.count("kvpo: got SIGTERM") == trials, res.stderr[-2000:]


def test_ctrl_c_asks_once_and_interrupts_the_second_time():
    """Ctrl-C (SIGINT) asks for a checkpoint and a stop like SIGTERM; a second one raises
    KeyboardInterrupt where the run is (Python's own Ctrl-C, which a notebook survives)."""
    code = (
        "import os, signal, time\n"
        "from kvpo.run.stopping import StopSignals\n"
        "with StopSignals(echo_s=0.5) as stop:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    assert stop.requested() == 'SIGINT'\n"
        "    time.sleep(0.6)\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        signal.pause()\n"
        "    except KeyboardInterrupt:\n"
        "        print('interrupted', flush=True)\n"
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
        "print('restored')\n"
    )
    res = _python(code)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == "interrupted\nrestored\n" and "kvpo: got SIGINT" in res.stderr


def test_a_signal_the_process_ignores_stays_ignored():
    """A job a shell started in the background without job control ignores SIGINT, so that a
    Ctrl-C meant for the foreground command does not reach it: kvpo leaves it so."""
    code = (
        "import os, signal\n"
        "from kvpo.run.stopping import StopSignals\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "with StopSignals() as stop:\n"
        "    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print(stop.requested(), flush=True)\n"
        "assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
        "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n"
    )
    res = _python(code)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == "SIGTERM\n" and "got SIGINT" not in res.stderr


@pytest.mark.parametrize(
    "module, where, call, done",
    [
        # during iteration 1's rollout and rewards: dropped, saved after 1
        ("kvpo.method.iteration", "micro_batch_rewards", 2, 1),
        (
            "kvpo.method.update",
            "accumulate_gradients",
            3,
            2,
        ),  # during its update: finished, saved after 2
    ],
)
def test_a_stopped_run_resumes_as_if_never_stopped(
    base, tmp_path, monkeypatch, capsys, module, where, call, done
):
    module = importlib.import_module(module)
    kw = dict(iterations=3, samples=False, ema=0.5, save_every=10, eval_every=10)
    straight = train(build_config(run_overrides(base, tmp_path / "a", **kw)))
    capsys.readouterr()
    real, calls = getattr(module, where), []

    def signalling(*args):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(module, where, signalling)
    cfg = build_config(run_overrides(base, tmp_path / "b", resume="auto", **kw))
    stopped = train(cfg)  # no checkpoint yet: auto starts afresh
    monkeypatch.undo()
    assert stopped.stopped_by == "SIGTERM"
    assert [h["iter"] for h in stopped.history] == list(range(-1, done))
    assert _saved_iteration(tmp_path / "b") == done and _rows(tmp_path / "b") == [-1, *range(done)]
    out = capsys.readouterr().out
    assert f"stopped by SIGTERM after {done} of 3 iterations" in out and "done:" not in out

    resumed = train(cfg)
    assert resumed.stopped_by is None
    assert f"resumed from {tmp_path / 'b' / 'checkpoint.safetensors'} after {done}" in (
        capsys.readouterr().out
    )
    for a, b in ((straight.model, resumed.model), (straight.ema, resumed.ema)):
        for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q), n
    assert [h["iter"] for h in resumed.history] == [-1, 0, 1, 2]

    def untimed(history):
        return [{k: v for k, v in h.items() if not k.startswith("time_")} for h in history]

    assert untimed(resumed.history) == untimed(straight.history)
    # environment.jsonl: a line per process that ran the run, with where it started
    starts = [
        json.loads(x) for x in (tmp_path / "b" / "environment.jsonl").read_text().splitlines()
    ]
    assert [e["start_iteration"] for e in starts] == [0, done]
    assert starts[0]["torch"] == torch.__version__ and "routed_attention" in starts[0]["backends"]


def test_the_cli_exits_with_the_signal_status_and_resumes(base, tmp_path, monkeypatch):
    """Stopped before any iteration ran, `--resume auto` neither repeats the evaluation before
    training nor loses it."""
    import kvpo.method.iteration

    real = kvpo.method.advantages.micro_batch_rewards

    def signalling(*args):
        os.kill(os.getpid(), signal.SIGUSR1)
        return real(*args)

    over = run_overrides(base, tmp_path, iterations=2, samples=False, save_every=10)
    args = cli_args(over)
    monkeypatch.setattr(kvpo.method.iteration, "micro_batch_rewards", signalling)
    with pytest.raises(SystemExit) as e:
        main(args + ["--resume", "auto"])
    assert e.value.code == 128 + signal.SIGUSR1 and _saved_iteration(tmp_path) == 0
    monkeypatch.undo()
    main(args + ["--resume", "auto"])
    assert _saved_iteration(tmp_path) == 2 and _rows(tmp_path) == [-1, 0, 1]
    history = json.loads(checkpoint_meta(tmp_path / "checkpoint.safetensors")["history"])
    assert [h["iter"] for h in history] == [-1, 0, 1]
    assert "resume: auto" in (tmp_path / "config.yaml").read_text().splitlines()


REWARD = """
import os, signal

calls = 0


def stop_rank_1(videos, prompts):
    global calls
    calls += 1
    if os.environ["RANK"] == "1" and calls == 2:  # iteration 1, on one rank only
        os.kill(os.getpid(), signal.SIGTERM)
    return videos.mean(dim=(1, 2, 3, 4))
"""


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_point(base, tmp_path):
    (tmp_path / "stop_reward.py").write_text(REWARD)
    over = run_overrides(
        base,
        tmp_path / "run",
        iterations=3,
        samples=False,
        save_every=10,
        eval_before=False,
        eval_every=10,
        prompts_per_iter=4,
    )
    args = cli_args(over)
    args += ["--reward_fns", f"mean={tmp_path / 'stop_reward.py'}:stop_rank_1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            free_port(),
            "-m",
            "kvpo.train",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode != 0, "a stopped run is not a finished one"
    assert "exitcode  : 143" in res.stderr, res.stderr[-4000:]
    assert res.stderr.count("kvpo: got SIGTERM") == 1  # rank 1 got it, rank 0 stopped with it
    assert "stopped by SIGTERM after 1 of 3 iterations" in res.stdout, res.stdout[-2000:]
    assert _saved_iteration(tmp_path / "run") == 1 and _rows(tmp_path / "run") == [0]


@pytest.mark.parametrize("to", ["torchrun", "every process"])
def test_torchrun_forwards_the_signal_and_waits_for_the_checkpoint(base, tmp_path, to):
    """The README's torchrun flags: SIGUSR1 to torchrun (SLURM's --signal=B:USR1 through the
    script) reaches every rank, which save and stop within --shutdown-timeout. SIGTERM to every
    process of the job (scancel: SLURM signals each process of the job step, torchrun's ranks
    too, whose sessions are their own) reaches each rank twice, straight and passed on by
    torchrun: one request, the same checkpoint."""
    out = tmp_path / "run"
    over = run_overrides(
        base,
        out,
        iterations=200,
        samples=False,
        save_every=1000,
        eval_before=False,
        eval_every=1000,
        prompts_per_iter=4,
    )
    args = cli_args(over)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            free_port(),
            "--signals-to-handle",
            "SIGTERM,SIGINT,SIGUSR1",
            "--shutdown-timeout",
            "120",
            "-m",
            "kvpo.train",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    sig = signal.SIGUSR1 if to == "torchrun" else signal.SIGTERM
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)  # the first iteration is done: the ranks are mid-run
        every = [agent.pid] + ([] if to == "torchrun" else descendants(agent.pid))
        assert len(every) == (1 if to == "torchrun" else 3)
        for pid in every:
            os.kill(pid, sig)
        stdout, stderr = agent.communicate(timeout=180)
    finally:
        for pid in descendants(agent.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        agent.kill()
    assert f"stopped by {sig.name} after" in stdout, stderr[-4000:]
    assert stderr.count(f"kvpo: got {sig.name}") == 2  # each rank's own, once
    done = _saved_iteration(out)
    assert 1 <= done < 200 and _rows(out) == list(range(done))


def test_max_minutes_stops_before_an_iteration_that_would_end_late(base, tmp_path, capsys):
    """The time limit: after the iteration whose end leaves less time than the longest one took,
    a checkpoint and a normal exit; --resume auto then ends where a run never stopped does."""
    kw = dict(iterations=3, samples=False, save_every=10, eval_every=10)
    straight = train(build_config(run_overrides(base, tmp_path / "a", **kw)))
    over = run_overrides(base, tmp_path / "b", resume="auto", max_minutes=1e-4, **kw)  # 6 ms
    args = cli_args(over)
    main(args)  # no SystemExit: a time limit is a normal end
    assert "stopped by max_minutes after 1 of 3 iterations" in capsys.readouterr().out
    assert _saved_iteration(tmp_path / "b") == 1 and _rows(tmp_path / "b") == [-1, 0]
    resumed = train(build_config({**over, "max_minutes": 0.0}))
    assert resumed.stopped_by is None and [h["iter"] for h in resumed.history] == [-1, 0, 1, 2]
    for (n, p), q in zip(
        straight.model.named_parameters(), resumed.model.parameters(), strict=True
    ):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="max_minutes=-1"):
        build_config({**over, "max_minutes": -1})


def test_a_stopped_run_is_not_restarted_over_by_mistake(base, tmp_path, capsys):
    """The command of a stopped run re-run without --resume auto is refused before it writes a
    thing (it would overwrite the run's logs at once, its checkpoint at the first save); over a
    finished run a fresh start goes ahead, saying so."""
    kw = dict(iterations=3, samples=False, save_every=10, eval_every=10, eval_before=False)
    over = run_overrides(base, tmp_path, max_minutes=1e-4, **kw)  # stops after 1 iteration
    train(build_config(over))
    metrics = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(
        SystemExit,
        match=r"out_dir .* holds an unfinished run \(1 of 3 iterations "
        r"done\): --resume auto continues it",
    ):
        main(cli_args({**over, "max_minutes": 0.0}))
    assert (tmp_path / "metrics.jsonl").read_text() == metrics and _saved_iteration(tmp_path) == 1
    train(build_config({**over, "max_minutes": 0.0, "resume": "auto"}))
    assert _saved_iteration(tmp_path) == 3
    capsys.readouterr()
    again = train(build_config({**over, "max_minutes": 0.0, "iterations": 1}))
    assert (
        f"out_dir {str(tmp_path)!r} held a finished run (3 iterations)" in capsys.readouterr().out
    )
    assert again.stopped_by is None and _saved_iteration(tmp_path) == 1


def test_a_run_killed_while_logging_resumes(base, tmp_path):
    """SIGKILL (the OOM killer, a scheduler's last word) can cut a log's last line mid-write:
    --resume auto drops it with the rows past the checkpoint, and the logs read on."""
    from kvpo.run.report import read_rows

    kw = dict(iterations=2, samples=False, save_every=1, eval_every=10)
    over = run_overrides(base, tmp_path, resume="auto", **kw)
    train(build_config(over))
    for name in ("metrics", "groups", "eval_prompts"):
        with (tmp_path / f"{name}.jsonl").open("a") as f:
            f.write('{"iter": 2, "reward": 1.2')  # killed here
    assert [r["iter"] for r in read_rows(tmp_path / "metrics.jsonl")] == [-1, 0, 1]
    train(build_config({**over, "iterations": 3}))
    assert _rows(tmp_path) == [-1, 0, 1, 2]
    (tmp_path / "broken.jsonl").write_text('{"iter": 0}\n{"iter": 1\n{"iter": 2}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl': line 2 is not JSON"):
        read_rows(tmp_path / "broken.jsonl")


def test_max_minutes_counts_the_loading_and_the_first_evaluation(base, tmp_path, monkeypatch):
    """A job's time limit runs from its start: after a generator that took 10 minutes to load,
    a 10-minute max_minutes stops the run after its first iteration (the loop always makes one),
    not after all three short ones."""
    import time

    import kvpo.trainer

    lost = [0.0]  # seconds the slow loading adds to the clock train() reads

    class Clock:
        perf_counter = staticmethod(time.perf_counter)

        @staticmethod
        def monotonic() -> float:
            return time.monotonic() + lost[0]

    real = kvpo.trainer.reference_and_policy

    def slow_loading(*args, **kw):
        lost[0] += 600.0
        return real(*args, **kw)

    monkeypatch.setattr(kvpo.trainer, "time", Clock)
    monkeypatch.setattr(kvpo.trainer, "reference_and_policy", slow_loading)
    kw = dict(iterations=3, samples=False, save_every=10, eval_every=10, max_minutes=10.0)
    result = train(build_config(run_overrides(base, tmp_path, **kw)))
    assert result.stopped_by == "max_minutes" and _saved_iteration(tmp_path) == 1
