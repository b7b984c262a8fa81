"""The events part of the Kubernetes manifests: the journal's default path is on a mounted, writable, disk-backed
volume in both variants, so acknowledged events survive a restart of the sidecar container."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from proxy.events.settings import QueueSettings
from tests.test_deploy import pod_spec, rendered, sidecar


@pytest.mark.parametrize("variant", ["example", "example-legacy"])
def test_the_journal_directory_is_a_writable_disk_volume(variant: str) -> None:
    spec = pod_spec(rendered(variant))
    journal_dir = str(PurePosixPath(QueueSettings().path).parent)
    mounts = [m for m in sidecar(spec)["volumeMounts"] if m["mountPath"] == journal_dir]
    assert len(mounts) == 1 and not mounts[0].get("readOnly"), f"mount a writable volume at {journal_dir}"
    volume = next(v for v in spec["volumes"] if v["name"] == mounts[0]["name"])
    assert "persistentVolumeClaim" in volume or volume["emptyDir"].get("medium") != "Memory", (
        "a memory-backed volume would count against the container's memory limit and vanish with the pod")
