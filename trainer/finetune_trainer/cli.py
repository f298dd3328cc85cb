"""`finetune-train`: train from a resolved config (pods) or a FinetuneJob YAML (laptops).

    finetune-train --config /etc/finetune/config.json          # in a pod, under torchrun
                                                               # (started by finetune_trainer.launch)
    finetune-train examples/tiny-cpu.yaml --output /tmp/run --nproc 2
    finetune-train --make-tiny-model DIR                       # write the tiny example model

Exit codes: 0 done, 2 bad spec/data/device (fix the spec), 3 out of memory, 1 anything else,
130/143 stopped by Ctrl-C/SIGTERM (rerun the same command to resume from the last checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

TERMINATION_LOG = Path("/dev/termination-log")
# Set by the local launcher in each process it starts: the folder where a process that
# fails writes its one-line error (the launcher prints one, not one per rank).
ERROR_DIR_ENV = "FINETUNE_ERROR_DIR"
BAD_INPUT, OOM, FAILED = 2, 3, 1
# How long the launcher lets the other ranks end on their own after one failed or after
# it forwarded a stop signal, before it kills them.
GRACE_SECONDS = 10.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-train", description=__doc__.split("\n")[0])
    parser.add_argument("job", nargs="?", help="a FinetuneJob YAML or resolved-config JSON")
    parser.add_argument("--config", help="resolved config JSON (as the operator mounts it)")
    parser.add_argument("--output", help="override output.path (local runs)")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="start N local processes (gloo on cpu); ignored under torchrun",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="start over: delete the output folder's checkpoints, adapter and markers first "
        "(a resume with another spec is refused without it)",
    )
    parser.add_argument(
        "--make-tiny-model", metavar="DIR", help="write the tiny example model and exit"
    )
    parser.add_argument("--log-level", default=os.environ.get("FINETUNE_LOG_LEVEL", "INFO"))
    return parser


class Stopped(Exception):
    """SIGTERM or SIGINT arrived: stop now, the last complete checkpoint is kept."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _ignore(signum: int, frame: FrameType | None) -> None:
    """After the first stop signal: the launcher's forwarded SIGTERM, a second Ctrl-C.
    (A Python no-op, not SIG_IGN: a signal already pending when the handler becomes SIG_IGN
    raises OSError in CPython.)"""


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGINT, _ignore)
    signal.signal(signal.SIGTERM, _ignore)
    raise Stopped(signum)


def _stop_line(signum: int, output: str | None) -> str:
    where = f" in {output}" if output else ""
    return (
        f"stopped by {signal.Signals(signum).name}; the last complete checkpoint{where} is "
        "kept: rerun the same command to resume"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In each started process: SIGTERM when the launcher dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _threads_per_process(nproc: int) -> str:
    """CPU threads per process: the cores this process may use, shared by the processes."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return str(max(1, cores // nproc))


def _forwarded(argv: list[str]) -> list[str]:
    """argv without --nproc and --restart (the launcher acts on them)."""
    forwarded, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc=") and arg != "--restart":
            forwarded.append(arg)
    return forwarded


def _read_errors(folder: Path) -> dict[int, dict[str, Any]]:
    errors = {}
    for path in folder.glob("rank-*.json"):
        with contextlib.suppress(ValueError, OSError):
            errors[int(path.stem.split("-")[1])] = json.loads(path.read_text())
    return errors


def _launch(nproc: int, argv: list[str], output: str | None) -> int:
    """Run this command in N processes on this machine, as torchrun --standalone would.

    The launcher owns the processes: the first failure ends the others (after a grace
    period), one line is printed for the run (the lowest rank's error), the exit code is
    the documented one (2 for bad input), and Ctrl-C/SIGTERM/the launcher's death stop
    every rank.
    """
    port = _free_port()
    threads = _threads_per_process(nproc)
    with tempfile.TemporaryDirectory(prefix="finetune-errors-") as folder:
        base = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": "0",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads),
            ERROR_DIR_ENV: folder,
        }
        command = [sys.executable, "-m", "finetune_trainer", *_forwarded(argv)]
        stopped: list[int] = []

        def forward(signum: int, frame: FrameType | None) -> None:
            stopped.append(signum)
            for process in processes:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)

        processes: list[subprocess.Popen[bytes]] = []
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for rank in range(nproc):
                env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                processes.append(subprocess.Popen(command, env=env, preexec_fn=_die_with_parent))
            codes = _wait_all(processes, stopped)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        errors = _read_errors(Path(folder))
    if stopped:
        return _fail(_stop_line(stopped[0], output), 128 + stopped[0])
    if errors:
        first = errors[min(errors)]
        return _fail(str(first["message"]), int(first["code"]))
    failed = [(rank, code) for rank, code in enumerate(codes) if code != 0]
    if failed:
        rank, code = failed[0]
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return _fail(f"rank {rank} ended with {how} (see its output above)", FAILED)
    return 0


def _wait_all(processes: list[subprocess.Popen[bytes]], stopped: list[int]) -> list[int]:
    """Wait for every process; once one fails (or a stop was forwarded) give the rest
    GRACE_SECONDS to end, then kill them."""
    deadline: float | None = None
    while True:
        codes = [process.poll() for process in processes]
        if all(code is not None for code in codes):
            return [int(code) for code in codes if code is not None]
        if deadline is None and (stopped or any(code not in (None, 0) for code in codes)):
            deadline = time.monotonic() + GRACE_SECONDS
        if deadline is not None and time.monotonic() > deadline:
            for process in processes:
                if process.poll() is None:
                    process.kill()
        time.sleep(0.1)


def _fail(message: str, code: int) -> int:
    """One line on stderr (or, under the local launcher, in the error folder: it prints)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder:
        path = Path(folder) / f"rank-{os.environ.get('RANK', '0')}.json"
        with contextlib.suppress(OSError):
            path.write_text(json.dumps({"message": message, "code": code}))
        return code
    print(f"finetune-train: error: {message}", file=sys.stderr, flush=True)
    if os.environ.get("RANK", "0") == "0" and TERMINATION_LOG.exists():  # kubelet mounts it
        with contextlib.suppress(OSError):  # Kubernetes shows it as the termination message
            TERMINATION_LOG.write_text(message[:4000])
    return code


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=args.log_level.upper() if rank == 0 else logging.WARNING,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
    )
    if args.make_tiny_model:
        from finetune_trainer.tiny import make_tiny_model

        print(make_tiny_model(args.make_tiny_model))
        return 0
    source = args.config or args.job
    if not source:
        _parser().print_usage(sys.stderr)
        return _fail("give a FinetuneJob YAML or --config resolved.json", BAD_INPUT)
    if args.nproc < 1:
        return _fail(f"--nproc {args.nproc}: give 1 or more processes", BAD_INPUT)
    launcher = args.nproc > 1 and "LOCAL_RANK" not in os.environ
    if args.restart and "LOCAL_RANK" in os.environ and ERROR_DIR_ENV not in os.environ:
        return _fail(
            "--restart is for local runs (it clears the output before any process starts); "
            "under torchrun, empty the output folder instead",
            BAD_INPUT,
        )

    from finetune_operator.resolve import SpecError
    from finetune_trainer.checks import preflight
    from finetune_trainer.config import load_config
    from finetune_trainer.data import DataError
    from finetune_trainer.resume import SpecChanged, check_resume, clear_run

    try:
        config = load_config(source, output=args.output)
        if launcher or "LOCAL_RANK" not in os.environ:
            # Checked once before any process starts; the processes check again (cheap).
            preflight(config)
            output = Path(config.output_path)
            if args.restart:
                for removed in clear_run(output):
                    logging.getLogger(__name__).info("--restart: removed %s", removed)
            else:
                check_resume(config, output)
    except (SpecError, DataError, SpecChanged) as error:
        return _fail(_one_line(error), BAD_INPUT)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as error:
        return _fail(_one_line(error), BAD_INPUT)
    if launcher:
        return _launch(args.nproc, argv, config.output_path)
    return _train(config)


def _train(config: Any) -> int:
    """This process's part of the run, every failure turned into one line and an exit code."""
    previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGINT, signal.SIGTERM)}
    # Known warnings nobody running the trainer can act on (raised inside transformers/peft).
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    if os.environ.get("RANK", "0") != "0" or not sys.stderr.isatty():
        # "Loading weights" bars, one per rank, are noise in a log (the training bar is rank
        # 0's in a terminal, and does not go through transformers' logging)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        from finetune_operator.resolve import SpecError
        from finetune_trainer.data import DataError, SourceUnreachable
        from finetune_trainer.device import DeviceError
        from finetune_trainer.fetch import FetchError
        from finetune_trainer.launch import report_refusal, start_world
        from finetune_trainer.model import ModelError
        from finetune_trainer.resume import SpecChanged
        from finetune_trainer.train import TrainingError, run

        try:
            # at the world size torchrun started (a rank per device the worker counted)
            run(start_world(config))
        except (SpecError, DataError, DeviceError, ModelError, SpecChanged) as error:
            return _fail(_one_line(error), BAD_INPUT)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as error:
            return _fail(_one_line(error), BAD_INPUT)
        except TrainingError as error:
            return _fail(_one_line(error), OOM if "out of device memory" in str(error) else FAILED)
        except SourceUnreachable as error:
            return _fail(_one_line(error), FAILED)
        except FetchError as error:  # a refusal needs a changed spec or secret, not a retry
            if error.retryable:
                return _fail(_one_line(error), FAILED)
            report_refusal(config, "HubRefused", str(error))
            return _fail(_one_line(error), BAD_INPUT)
    except (Stopped, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
        return _fail(_stop_line(signum, config.output_path), 128 + signum)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
