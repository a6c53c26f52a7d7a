"""Run `kdstudent` commands as separate processes without paying the imports each time.

    python tests/fork_runner.py < jobs.json      prints the exit codes, one per job, as JSON

A job is {"argv": [...], "env": {...}, "log": PATH, "ranks": N, "snapshot": DIR}: after it ends, DIR (if any) is
copied to DIR.after-<job number>, so that a test sees what each job left. This process imports torch, transformers, peft
and moekd once (and runs nothing), then forks one child per job (N children joined by a gloo process group for
N ranks, as torchrun would start them: RANK, WORLD_SIZE, MASTER_ADDR, ... set); each child calls
`cli.kdstudent.main(argv)` with its own environment, stdout and stderr in `log`, and exits with its return code.
A child is a real process: it can be SIGKILLed at a crash point (MOEKD_FAULT), hold locks, start DataLoader
workers. Forking a parent that never ran a torch op is safe (no OpenMP pool exists yet); importing per job would
cost ~8 s of CPU on the test machine, the training itself under a second.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _child(job: dict, rank: int) -> None:
    fd = os.open(job["log"] + (f".rank{rank}" if job.get("ranks", 1) > 1 else ""),
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(job.get("env", {}))
    if job.get("ranks", 1) > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(job["ranks"]),
                          LOCAL_WORLD_SIZE=str(job["ranks"]), MASTER_ADDR="127.0.0.1")
    rc = 1
    try:
        from cli import kdstudent

        rc = kdstudent.main(job["argv"])
    except BaseException:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def main() -> int:
    jobs = json.loads(sys.stdin.read())
    import peft  # noqa: F401  (the imports every job needs, once)
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import cli.kdstudent  # noqa: F401
    import student.convert  # noqa: F401
    import student.evaluate  # noqa: F401
    import student.io  # noqa: F401
    import student.train  # noqa: F401

    codes = []
    for number, job in enumerate(jobs):
        pids = []
        for rank in range(job.get("ranks", 1)):
            pid = os.fork()
            if pid == 0:
                _child(job, rank)
            pids.append(pid)
        statuses = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        codes.append(statuses[0] if len(set(statuses)) == 1 else statuses)
        if job.get("snapshot") and os.path.isdir(job["snapshot"]):
            shutil.copytree(job["snapshot"], f"{job['snapshot']}.after-{number}")
    print(json.dumps(codes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
