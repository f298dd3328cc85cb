"""Model and data fetched once per job, into the output volume, before any rank loads them.

Every rank of every worker used to call `from_pretrained` on the hub id at start: a 4 x 2 job
asked the hub for the same files eight times at once, into one cache on shared storage whose
file locks (NFS, some CSI drivers) do not hold. Here global rank 0 downloads each hub item
(`snapshot_download` at the spec's revision) into `<output>/.cache/finetune-hub/...`, under a
temporary name, renames it into place and writes a marker last; every other rank, on any
node, waits for the marker (or for rank 0's error marker, so that all ranks stop with the
same one line) and then loads the local copy. A second job on the same volume with the same
item and revision finds the marker and fetches nothing. Local paths and bundled items are
used as they are.

Hub errors become one line that says what to change: not authorised or gated (the secret
and the model), not found (the id and revision), and the network (retried with backoff for
FETCH_RETRY_SECONDS, then given up).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer.checks import looks_local
from finetune_trainer.tiny import BUNDLED_PREFIX

log = logging.getLogger(__name__)

COMPLETE = ".fetch-complete"
FAILED = ".fetch-failed"
FETCH_RETRY_SECONDS = float(os.environ.get("FINETUNE_FETCH_RETRY_SECONDS", 300))
WAIT_SECONDS = float(os.environ.get("FINETUNE_FETCH_WAIT_SECONDS", 6 * 3600))


class FetchError(RuntimeError):
    """The hub refused or could not serve an item. `retryable`: a network failure, which a
    restart may get past; the others need a change to the spec or the secret."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class HubItem:
    repo_id: str
    repo_type: str  # "model" or "dataset"
    revision: str | None

    @property
    def folder(self) -> str:
        name = self.repo_id.replace("/", "--")
        return f"{self.repo_type}s--{name}@{self.revision or 'main'}"


def is_hub_id(name: str) -> bool:
    """A hub id ("org/name" or "name"), not a bundled item or a path on this machine."""
    if name.startswith(BUNDLED_PREFIX) or looks_local(name):
        return False
    return not Path(name).expanduser().exists()


def fetch_root(output_path: str) -> Path:
    return Path(output_path) / ".cache" / "finetune-hub"


def local_copy(
    item: HubItem,
    root: Path,
    is_main: bool,
    token: str | None,
    secret: str | None = None,
    download: Callable[..., Any] | None = None,
) -> Path:
    """The folder holding `item`, fetched by the main process, awaited by the others."""
    target = root / item.folder
    if (target / COMPLETE).exists():
        return target
    if not is_main:
        return _wait_for(target, item)
    root.mkdir(parents=True, exist_ok=True)
    (target / FAILED).unlink(missing_ok=True)
    try:
        _download(item, target, token, secret, download)
    except FetchError as error:
        target.mkdir(parents=True, exist_ok=True)
        (target / FAILED).write_text(
            json.dumps({"error": str(error), "retryable": error.retryable})
        )
        raise
    return target


def _download(
    item: HubItem,
    target: Path,
    token: str | None,
    secret: str | None,
    download: Callable[..., Any] | None,
) -> None:
    from huggingface_hub import snapshot_download

    download = download or snapshot_download
    for name in ("httpx", "httpx2"):  # a line per HTTP request is noise in a worker's log
        logging.getLogger(name).setLevel(logging.WARNING)
    ignore = _unused_weight_files(item, token)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    started = time.monotonic()
    delay = 2.0
    while True:
        shutil.rmtree(partial, ignore_errors=True)
        try:
            download(
                repo_id=item.repo_id,
                repo_type=item.repo_type,
                revision=item.revision,
                local_dir=str(partial),
                token=token,
                ignore_patterns=ignore,
            )
            break
        except Exception as error:
            failure = classify(error, item, secret)
            if not failure.retryable or time.monotonic() - started > FETCH_RETRY_SECONDS:
                shutil.rmtree(partial, ignore_errors=True)
                raise failure from error
            log.warning("%s; retrying in %.0f s", failure, delay)
            time.sleep(delay)
            delay = min(delay * 2, 60.0)
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # the download's own bookkeeping
    shutil.rmtree(target, ignore_errors=True)  # a failed or half-written earlier attempt
    partial.rename(target)
    (target / COMPLETE).write_text(json.dumps({"repo": item.repo_id, "revision": item.revision}))
    log.info("fetched %s %s into %s", item.repo_type, item.repo_id, target)


# Other serialisations of the same weights: transformers loads safetensors where a model has
# them, so a Llama-2-7B repository is 13 GB to fetch instead of 27 GB.
OTHER_WEIGHT_FORMATS = ["*.bin", "*.pth", "*.pt", "*.h5", "*.msgpack", "*.ckpt", "original/*"]


def _unused_weight_files(item: HubItem, token: str | None) -> list[str] | None:
    """Patterns to leave out of a model's download: the other weight formats, where the
    repository has safetensors. None where it cannot be listed (the download then says why)."""
    if item.repo_type != "model":
        return None
    from huggingface_hub import HfApi

    try:
        files = HfApi().list_repo_files(item.repo_id, revision=item.revision, token=token)
    except Exception:
        return None
    return OTHER_WEIGHT_FORMATS if any(f.endswith(".safetensors") for f in files) else None


def _wait_for(target: Path, item: HubItem) -> Path:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if (target / COMPLETE).exists():
            return target
        failed = target / FAILED
        if failed.exists():
            record = json.loads(failed.read_text())
            raise FetchError(record["error"], retryable=bool(record.get("retryable")))
        time.sleep(1.0)
    raise FetchError(
        f"{item.repo_type} {item.repo_id}: rank 0 did not finish fetching it within "
        f"{WAIT_SECONDS:.0f} s; check the first worker's log",
        retryable=True,
    )


def classify(error: BaseException, item: HubItem, secret: str | None) -> FetchError:
    """One line per kind of hub failure, saying what to change."""
    from huggingface_hub import errors

    what = f"{item.repo_type} {item.repo_id}" + (
        f" at revision {item.revision}" if item.revision else ""
    )
    status = getattr(getattr(error, "response", None), "status_code", None)
    where = f"the token in secret {secret}" if secret else "no token (spec.hfTokenSecret is unset)"
    cause = error.__cause__
    if isinstance(error, errors.LocalEntryNotFoundError) and isinstance(
        cause, errors.HfHubHTTPError
    ):
        return classify(cause, item, secret)  # the hub answered, and said no
    if isinstance(error, errors.LocalEntryNotFoundError):  # the hub was not reached
        return FetchError(
            f"{what}: the hub could not be reached ({_first_line(error)}); check the network "
            "or HF_ENDPOINT",
            retryable=True,
        )
    if isinstance(error, errors.GatedRepoError) or status == 403:
        return FetchError(
            f"{what} is gated and {where} has no access: accept its terms on the hub with the "
            "token's account, or set spec.hfTokenSecret to a secret whose token has access"
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return FetchError(f"{what}: no such revision on the hub; fix model.revision")
    if status in (401, 404) or isinstance(error, errors.RepositoryNotFoundError):
        field = "model.name" if item.repo_type == "model" else "dataset.name"
        return FetchError(
            f"{what}: not found on the hub, or private and not readable with {where}: "
            f"check {field} and the token"
        )
    if isinstance(error, errors.EntryNotFoundError):
        return FetchError(f"{what}: a file it lists is missing on the hub ({_first_line(error)})")
    reason = f"{type(error).__name__}: {_first_line(error)}"
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return FetchError(f"{what}: the hub refused it ({reason})")
    return FetchError(f"{what}: could not be fetched from the hub ({reason})", retryable=True)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def fetch_config_items(config: Any, is_main: bool) -> Any:
    """The config with hub model and dataset ids replaced by local copies (fetched once).

    Offline (HF_HUB_OFFLINE), hub ids are left as they are: the loaders read the cache."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return config
    token = os.environ.get("HF_TOKEN")
    secret = os.environ.get("FINETUNE_HF_TOKEN_SECRET")
    root = fetch_root(config.output_path)
    update: dict[str, Any] = {}
    if is_hub_id(config.model_name):
        item = HubItem(config.model_name, "model", config.model_revision)
        update["model_name"] = str(local_copy(item, root, is_main, token, secret))
        update["model_revision"] = None
    if is_hub_id(config.dataset_name):
        item = HubItem(config.dataset_name, "dataset", None)
        update["dataset_name"] = str(local_copy(item, root, is_main, token, secret))
    return config.model_copy(update=update) if update else config
