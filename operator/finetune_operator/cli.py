"""`finetune-operator`: crd | render FILE | rbac | run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from finetune_operator.crd import crd_yaml
from finetune_operator.objects import JobRef, build_desired_objects
from finetune_operator.resolve import SpecError, check_name, load_manifest, parse_spec, resolve
from finetune_operator.settings import OperatorSettings


class _ReadableDumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's config.json) as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ReadableDumper.add_representer(str, _represent_str)


def render(text: str, settings: OperatorSettings) -> str:
    """The objects a FinetuneJob manifest becomes, as a multi-document YAML stream."""
    manifest = load_manifest(text)
    metadata = manifest.get("metadata") or {}
    spec = parse_spec(manifest.get("spec") or {})
    resolved = resolve(spec, settings.device_resources)
    check_name(metadata.get("name") or "finetunejob")
    job = JobRef(
        name=metadata.get("name") or "finetunejob",
        namespace=metadata.get("namespace") or "default",
        # A dry run has no object yet: the API server sets the real uid.
        uid=metadata.get("uid") or "00000000-0000-0000-0000-000000000000",
        labels=metadata.get("labels"),
    )
    objects = build_desired_objects(job, spec, resolved, settings).all()
    return yaml.dump_all(objects, Dumper=_ReadableDumper, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-operator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("crd", help="print the FinetuneJob CRD")
    render_parser = commands.add_parser(
        "render", help="print the objects a FinetuneJob becomes (a dry run)"
    )
    render_parser.add_argument("file", type=Path, help="FinetuneJob YAML ('-' for stdin)")
    render_parser.add_argument("--image", help="trainer image (default: the operator's)")
    rbac_parser = commands.add_parser(
        "rbac", help="print the operator's RBAC rules (the chart's files/operator-rules.yaml)"
    )
    rbac_parser.add_argument(
        "--leader-election",
        action="store_true",
        help="the rules for the leader-election Lease instead (files/leader-election-rules.yaml)",
    )
    commands.add_parser("run", help="run the operator (kopf)", add_help=False)
    args, rest = parser.parse_known_args(argv)

    if args.command == "crd":
        sys.stdout.write(crd_yaml())
        return 0
    if args.command == "rbac":
        from finetune_operator.rbac import rules_yaml

        sys.stdout.write(rules_yaml(leader_election=args.leader_election))
        return 0
    if args.command == "render":
        settings = OperatorSettings.from_env()
        if args.image:
            settings = OperatorSettings(**{**settings.__dict__, "trainer_image": args.image})
        text = sys.stdin.read() if str(args.file) == "-" else args.file.read_text()
        try:
            sys.stdout.write(render(text, settings))
        except SpecError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    from finetune_operator.main import run  # kopf and kubernetes: the operator extra

    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
