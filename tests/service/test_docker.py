"""The shipped container files, checked without a Docker engine.

The Dockerfiles are parsed with Docker's own parser (the `dockerfile`
package); everything they copy must exist, their entry points must be our
CLIs with arguments those CLIs accept, and the compose file must wire the
two containers to one socket volume.
"""

from __future__ import annotations

from pathlib import Path

import dockerfile
import pytest
import yaml

from devserver.__main__ import build_parser as devserver_parser
from devserver.__main__ import parse_specs
from devserver.service.server import DevServer
from vmm_client.__main__ import build_parser as vmm_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
FILES = {"devserver": "devserver.Dockerfile", "vmm": "vmm.Dockerfile"}


def instructions(name: str) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKER / name)))


def check_cli(module: str, argv: list[str]) -> None:
    if module == "devserver":
        args = devserver_parser().parse_args(argv)
        parse_specs(args.device)
    else:
        vmm_parser().parse_args(argv)


@pytest.mark.parametrize("name", FILES.values())
def test_dockerfile_copies_what_exists_and_runs_unprivileged(name: str) -> None:
    commands = instructions(name)
    for command in commands:
        if command.cmd == "COPY" and not any(f.startswith("--from") for f in command.flags):
            for source in command.value[:-1]:
                assert (ROOT / source).exists(), f"{name} copies missing {source}"
    final_stage = commands[max(i for i, c in enumerate(commands) if c.cmd == "FROM") :]
    users = [c.value[0] for c in final_stage if c.cmd == "USER"]
    assert users and users[-1] not in ("root", "0")


@pytest.mark.parametrize(("service", "name"), FILES.items())
def test_entrypoint_and_cmd_are_accepted_by_our_cli(service: str, name: str) -> None:
    commands = {c.cmd: c for c in instructions(name)}
    entry = list(commands["ENTRYPOINT"].value)
    assert entry[:2] == ["python", "-m"]
    check_cli(entry[2], list(commands["CMD"].value))


def test_compose_wires_both_containers_to_one_socket_volume() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == set(FILES)
    for service, spec in services.items():
        assert (
            ROOT / spec["build"]["context"].replace("..", ".") / spec["build"]["dockerfile"]
        ).is_file()
        assert spec["build"]["dockerfile"] == f"docker/{FILES[service]}"
        assert "run:/run/devmodel" in spec["volumes"]
        entry = {c.cmd: c for c in instructions(FILES[service])}["ENTRYPOINT"].value
        check_cli(entry[2], spec["command"])
    assert "run" in compose["volumes"]
    assert services["vmm"]["depends_on"]["devserver"]["condition"] == "service_healthy"


async def test_healthcheck_command_reports_serving(server: DevServer) -> None:
    import asyncio
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devserver.service.healthcheck",
        server.address,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and out.strip() == b"serving"
