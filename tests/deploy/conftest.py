"""The Helm binary for the chart tests: built by ``make deploy-check``, cached by version."""

from __future__ import annotations

import subprocess

import pytest

from tests.deploy.manifests import ROOT


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of the cached Helm v4 binary; the chart tests skip when it was never built."""
    found = subprocess.run(
        [str(ROOT / "scripts" / "helm.sh"), "--cached"],
        check=False,
        capture_output=True,
        text=True,
    )
    if found.returncode != 0:
        pytest.skip("Helm is not built on this machine: `make deploy-check` builds it (~4 min)")
    return found.stdout.strip()
