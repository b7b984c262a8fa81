"""Writes the PrometheusRule objects of the kustomize components from dashboards/prometheus/imsidecar-rules.yaml.

The rules file is the one source; kustomize cannot read files outside a component's folder, so each component
carries a generated copy (sidecar-legacy includes the sidecar component), and tests/test_deploy.py fails when a copy differs. Run: python deploy/kubernetes/sync_prometheusrule.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "dashboards" / "prometheus" / "imsidecar-rules.yaml"
TARGETS = [ROOT / "deploy" / "kubernetes" / "sidecar" / "prometheusrule.yaml"]   # sidecar-legacy includes it
HEADER = "# Generated from dashboards/prometheus/imsidecar-rules.yaml by deploy/kubernetes/sync_prometheusrule.py.\n"


def prometheus_rule() -> dict[str, object]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "imsidecar", "labels": {"app.kubernetes.io/name": "imsidecar"}},
        "spec": {"groups": yaml.safe_load(RULES.read_text())["groups"]},
    }


def main() -> None:
    text = HEADER + yaml.safe_dump(prometheus_rule(), sort_keys=False, allow_unicode=True, width=120)
    for target in TARGETS:
        target.write_text(text)
        print(f"wrote {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
