"""Operator settings: what shapes the desired objects (`OperatorSettings`), and the whole
configuration of `finetune-operator run` (`RunConfig`), whose flags and `FTO_*` environment
twins are derived from its fields, so that each default is stated once."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-operator/trainer:0.1.0-xpu"
FIELD_MANAGER = "finetune-operator"


@dataclass(frozen=True)
class OperatorSettings:
    """Everything the desired objects depend on besides the FinetuneJob itself.

    Defaults: trainer image `DEFAULT_TRAINER_IMAGE`, rendezvous port 29500, image pull policy
    IfNotPresent, pods run as uid/gid 1000, all namespaces watched.
    """

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    rendezvous_port: int = 29500
    run_as_user: int = 1000
    # Resource name per device kind ("xpu", "cuda"), overriding api.DEFAULT_DEVICE_RESOURCE.
    device_resources: dict[str, str] = field(default_factory=dict)
    namespaces: tuple[str, ...] = ()
    # Labels added to every worker pod template. For tests only (e.g. the local control
    # plane's `finetune.dev/simulate=manual`); empty in production.
    extra_pod_labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        """The settings the `FTO_*` environment gives (`finetune-operator render` uses them)."""
        return parse_args([], environ).settings


def parse_labels(text: str) -> dict[str, str]:
    """Labels from "k=v,k2=v2" (FTO_EXTRA_POD_LABELS)."""
    labels = {}
    for item in text.split(","):
        if item.strip():
            key, _, value = item.partition("=")
            labels[key.strip()] = value.strip()
    return labels


def default_identity(environ: Mapping[str, str] | None = None) -> str:
    """Unique per replica: the pod name in a cluster, host and pid elsewhere."""
    env = os.environ if environ is None else environ
    return env.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


# -- `finetune-operator run`: one field per setting, its flag and env twin derived ----------------


@dataclass(frozen=True)
class Option:
    """How a RunConfig field is set from outside: its help, and its flag and environment twin
    when they are not `--field-name` and `FTO_FIELD_NAME`."""

    help: str
    flag: str = ""
    env: str = ""
    short: str | None = None
    choices: tuple[str, ...] | None = None


def _option(default: Any, help: str, **how: Any) -> Any:
    return field(default=default, metadata={"option": Option(help, **how)})


@dataclass(frozen=True)
class RunConfig:
    """The configuration of `finetune-operator run`. A flag wins over its environment twin,
    which wins over the default; an empty environment value counts as unset."""

    namespaces: tuple[str, ...] = _option(
        (),
        "namespace to watch (repeat, or comma-separated); none: all namespaces",
        flag="--namespace",
        short="-n",
    )
    all_namespaces: bool = _option(False, "watch every namespace", short="-A")
    trainer_image: str = _option(OperatorSettings.trainer_image, "trainer image")
    image_pull_policy: str = _option(
        OperatorSettings.image_pull_policy, "the trainer image's pull policy"
    )
    xpu_resource: str = _option(
        "", "device resource for device xpu (e.g. gpu.intel.com/xe); none: the API's default"
    )
    extra_pod_labels: str = _option(
        "", "k=v,... labels added to every worker pod template (tests only)"
    )
    log_format: str = _option("text", "log lines as text or JSON", choices=("text", "json"))
    log_level: str = _option("INFO", "log level")
    metrics_port: int = _option(8080, "Prometheus /metrics port; 0 turns it off")
    worker_limit: int = _option(8, "reconcile worker threads (at least 1)")
    qps: float = _option(20.0, "most API requests a second the reconciler sends", env="FTO_API_QPS")
    resync_seconds: float = _option(
        30.0, "reconcile every FinetuneJob not yet finished at least this often, from the cache"
    )
    relist_seconds: float = _option(
        600.0,
        "re-LIST every watched kind into the cache this often, a safety net against missed "
        "watch events; 0: never",
    )
    leader_elect: bool = _option(True, "hold a Lease so that only one replica acts")
    lease_namespace: str = _option(
        "",
        "namespace of the Lease; none: the pod's (POD_NAMESPACE), else the first watched, "
        "else default",
        flag="--leader-election-namespace",
        env="FTO_LEADER_ELECTION_NAMESPACE",
    )
    lease_duration: int = _option(15, "seconds a Lease holds without renewal")
    replace_grace_seconds: float = _option(
        120.0,
        "how long a replaced worker group may take to go before its Job is let go and its "
        "pods orphaned (pods stuck Terminating on an unreachable node)",
    )
    identity: str = _option("", "replica identity; none: the pod's name (POD_NAME)")

    @property
    def clusterwide(self) -> bool:
        return self.all_namespaces or not self.namespaces

    @property
    def settings(self) -> OperatorSettings:
        return OperatorSettings(
            trainer_image=self.trainer_image,
            image_pull_policy=self.image_pull_policy,
            device_resources={"xpu": self.xpu_resource} if self.xpu_resource else {},
            namespaces=() if self.clusterwide else self.namespaces,
            extra_pod_labels=parse_labels(self.extra_pod_labels),
        )


def options() -> list[tuple[str, Option, Any]]:
    """(field name, option with its flag and env filled in, default) of every RunConfig field."""
    result = []
    for f in fields(RunConfig):
        option: Option = f.metadata["option"]
        option = replace(
            option,
            flag=option.flag or "--" + f.name.replace("_", "-"),
            env=option.env or "FTO_" + f.name.upper(),
        )
        result.append((f.name, option, f.default))
    return result


def _split(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(n.strip() for item in items for n in item.split(",") if n.strip())


def _from_env(text: str, default: Any) -> Any:
    if isinstance(default, bool):
        return text.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, tuple):
        return _split([text])
    return type(default)(text)


def run_parser() -> argparse.ArgumentParser:
    """The flags of `finetune-operator run`, one per RunConfig field. Flags not given are
    absent from the parsed namespace, so the environment and the defaults can fill them."""
    parser = argparse.ArgumentParser(
        prog="finetune-operator run",
        description="Run the FinetuneJob operator. Every flag has an FTO_* environment twin.",
        argument_default=argparse.SUPPRESS,
    )
    for name, option, default in options():
        names = [option.flag, *([option.short] if option.short else [])]
        help = f"{option.help} (env {option.env}; default: {default!r})"
        if isinstance(default, bool):
            parser.add_argument(*names, dest=name, action=argparse.BooleanOptionalAction, help=help)
        elif isinstance(default, tuple):
            parser.add_argument(*names, dest=name, action="append", help=help)
        else:
            parser.add_argument(
                *names, dest=name, type=type(default), choices=option.choices, help=help
            )
    return parser


def parse_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> RunConfig:
    """RunConfig from flags over the environment (os.environ when not given) over defaults;
    then the Lease namespace and the identity, when not set, from the pod."""
    env = os.environ if environ is None else environ
    flags = vars(run_parser().parse_args(list(argv)))
    values: dict[str, Any] = {}
    for name, option, default in options():
        if name in flags:
            values[name] = _split(flags[name]) if isinstance(default, tuple) else flags[name]
        elif env.get(option.env, "").strip():
            values[name] = _from_env(env[option.env], default)
    config = RunConfig(**values)
    namespaces = config.settings.namespaces
    return replace(
        config,
        worker_limit=max(1, config.worker_limit),
        log_level=config.log_level.upper(),
        lease_namespace=config.lease_namespace
        or env.get("POD_NAMESPACE")
        or (namespaces[0] if namespaces else "default"),
        identity=config.identity or default_identity(env),
    )
