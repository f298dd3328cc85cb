"""`finetune-train`: train from a resolved config (pods) or a FinetuneJob YAML (laptops).

    finetune-train --config /etc/finetune/config.json          # in a pod, under torchrun
    finetune-train examples/tiny-cpu.yaml --output /tmp/run --nproc 2
    finetune-train --make-tiny-model DIR                       # write the tiny example model

Exit codes: 0 done, 2 bad spec/data/device (fix the spec), 3 out of memory, 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

TERMINATION_LOG = Path("/dev/termination-log")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-train", description=__doc__.split("\n")[0])
    parser.add_argument("job", nargs="?", help="a FinetuneJob YAML or resolved-config JSON")
    parser.add_argument("--config", help="resolved config JSON (as the operator mounts it)")
    parser.add_argument("--output", help="override output.path (local runs)")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="start N local processes with torchrun (gloo on cpu); ignored under torchrun",
    )
    parser.add_argument(
        "--make-tiny-model", metavar="DIR", help="write the tiny example model and exit"
    )
    parser.add_argument("--log-level", default=os.environ.get("FINETUNE_LOG_LEVEL", "INFO"))
    return parser


def _relaunch(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with N processes on this machine."""
    forwarded, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            forwarded.append(arg)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "finetune_trainer",
        *forwarded,
    ]
    return subprocess.call(command)


def _fail(message: str, code: int) -> int:
    print(f"finetune-train: error: {message}", file=sys.stderr, flush=True)
    if os.environ.get("RANK", "0") == "0" and TERMINATION_LOG.exists():  # kubelet mounts it
        with contextlib.suppress(OSError):  # Kubernetes shows it as the termination message
            TERMINATION_LOG.write_text(message[:4000])
    return code


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
        return _fail("give a FinetuneJob YAML or --config resolved.json", 2)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch(args.nproc, argv)

    from finetune_operator.resolve import SpecError
    from finetune_trainer.config import load_config
    from finetune_trainer.data import DataError
    from finetune_trainer.device import DeviceError
    from finetune_trainer.train import TrainingError, run

    try:
        run(load_config(source, output=args.output))
    except (SpecError, DataError, DeviceError, FileNotFoundError) as error:
        return _fail(str(error), 2)
    except TrainingError as error:
        return _fail(str(error), 3 if "out of device memory" in str(error) else 1)
    return 0
