#!/usr/bin/env python3
"""Kueue's webhook registrations, pointed at a Kueue controller running as a local process.

Reads config/components/webhook/manifests.yaml from the Kueue module source (the webhooks of
exactly the version built) and prints them with `clientConfig.url` on 127.0.0.1 and the CA that
signed the controller's serving certificate, in place of the in-cluster Service. Only the
webhooks of what the local Kueue serves are kept: its own kinds (kueue.x-k8s.io) and batch Jobs.
The others (Pods, Deployments, JobSets, ...) have failurePolicy Fail and no handler here, so
registering them would refuse every Pod or Deployment in the cluster.

Usage: kueue-webhooks.py MANIFESTS.yaml CA.crt PORT
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import yaml

SERVED_GROUPS = {"kueue.x-k8s.io", "batch"}


def main() -> None:
    manifests, ca_file, port = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    ca_bundle = base64.b64encode(ca_file.read_bytes()).decode()
    out = []
    for doc in yaml.safe_load_all(manifests.read_text()):
        if not doc:
            continue
        kept = []
        for webhook in doc.get("webhooks") or []:
            groups = {g for rule in webhook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if not groups or not groups <= SERVED_GROUPS:
                continue
            path = webhook["clientConfig"]["service"]["path"]
            webhook["clientConfig"] = {
                "url": f"https://127.0.0.1:{port}{path}",
                "caBundle": ca_bundle,
            }
            kept.append(webhook)
        doc["metadata"]["name"] = f"kueue-{doc['metadata']['name']}"
        doc["webhooks"] = kept
        out.append(doc)
    sys.stdout.write(yaml.safe_dump_all(out, sort_keys=False))


if __name__ == "__main__":
    main()
