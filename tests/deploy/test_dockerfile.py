"""deploy/Dockerfile read statically (no container engine on these machines)."""

from __future__ import annotations

import json
import re

from tests.deploy.manifests import DOCKERFILE


def _stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, args.strip()))
    return stages


def test_image_is_multi_stage_and_the_final_stage_holds_only_the_runtime():
    """The final stage copies the built environment from the build stage and installs nothing itself."""
    stages = _stages()
    assert len(stages) >= 2
    final = stages[-1]
    assert not any(i == "RUN" and re.search(r"\bpip\b|apt-get|compileall", a) for i, a in final)
    copies = [a for i, a in final if i == "COPY"]
    assert copies
    assert all(a.startswith("--from=") for a in copies)


def test_no_development_dependencies_are_installed():
    """The build installs the package without its [test] extra; no test tool is named."""
    installs = [a for stage in _stages() for i, a in stage if i == "RUN" and "pip install" in a]
    assert installs
    for command in installs:
        assert "[test]" not in command
        assert "-e " not in command  # an editable install would need the source at runtime
        for tool in ("pytest", "ruff", "mypy", "hypothesis"):
            assert tool not in command


def test_runs_as_a_numeric_non_root_user_with_m365sync_as_entrypoint():
    """The final stage's USER is a numeric uid other than 0, and the entrypoint is `m365sync` so the role is the argument."""
    final = _stages()[-1]
    users = [a for i, a in final if i == "USER"]
    assert users
    uid = users[-1].split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0
    (entrypoint,) = [a for i, a in final if i == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["m365sync"]
