"""QEMU provisioning without network: cache paths, mirrors, mounts, the install's commit point."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from vmm_client.qemu import provision as prov
from vmm_client.qemu.hostutil import (
    HostError,
    NeedsRootError,
    Steps,
    cache_root,
    mounts_under,
    resolve_in_root,
    safe_rmtree,
    unmount_all_under,
)
from vmm_client.qemu.provision import (
    QemuVersion,
    host_mirrors,
    load_tree,
    parse_qemu_version,
    provision,
    qemu_command,
    sources_list,
)


def quiet(_line: str) -> None:
    pass


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DEVMODEL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "devmodel"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_root() == tmp_path / ".cache" / "devmodel"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "devmodel"
    monkeypatch.setenv("DEVMODEL_CACHE", str(tmp_path / "override"))
    assert cache_root() == tmp_path / "override"
    assert prov.default_tree_path() == tmp_path / "override" / "qemu-trixie"


def test_host_mirrors_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
    )
    (d / "a-disabled.sources").write_text(
        "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\nEnabled: no\n"
    )
    (d / "debian.sources").write_text(
        "Types: deb\n"
        "# http://snapshot.debian.org/archive/debian/20250520T000000Z\n"
        "URIs: http://mirror.example/pub/debian/\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n"
        "\n"
        "Types: deb\n"
        "URIs: http://mirror.example/pub/debian-security\n"
        "Suites: bookworm-security\n"
    )
    (d / "other.list").write_text(
        "deb [arch=amd64 signed-by=/k.gpg] https://x.example/apt sdk main\n"
    )
    m = host_mirrors(tmp_path)
    assert m.debian == "http://mirror.example/pub/debian"
    assert m.security == "http://mirror.example/pub/debian-security"
    text = sources_list(m)
    assert "deb http://mirror.example/pub/debian trixie-backports main" in text
    assert "deb http://mirror.example/pub/debian-security trixie-security main" in text
    assert len(text.splitlines()) == 4


def test_host_mirrors_fallbacks(tmp_path: Path) -> None:
    assert host_mirrors(tmp_path / "nothing").debian == "http://deb.debian.org/debian"
    (tmp_path / "sources.list").write_text(
        "deb [trusted=yes] http://m.example/debian bookworm main\n"
    )
    m = host_mirrors(tmp_path)
    assert (m.debian, m.security) == ("http://m.example/debian", "http://m.example/debian-security")


MOUNTS = """\
sysfs /sys sysfs rw 0 0
proc /x/tree/proc proc rw 0 0
udev /x/tree/dev devtmpfs rw 0 0
devpts /x/tree/dev/pts devpts rw 0 0
tmpfs /x/tree2/proc tmpfs rw 0 0
tmpfs /x/with\\040space/sys tmpfs rw 0 0
"""


def test_mounts_under_is_deepest_first_and_not_fooled_by_prefixes() -> None:
    assert mounts_under(Path("/x/tree"), MOUNTS) == [
        "/x/tree/dev/pts",
        "/x/tree/proc",
        "/x/tree/dev",
    ]
    assert mounts_under(Path("/x/with space"), MOUNTS) == ["/x/with space/sys"]
    assert mounts_under(Path("/elsewhere"), MOUNTS) == []


def test_safe_rmtree_refuses_a_tree_with_mounts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "t" / "dev").mkdir(parents=True)
    monkeypatch.setattr(
        "vmm_client.qemu.hostutil.mounts_under", lambda p, text=None: [str(p / "dev")]
    )
    with pytest.raises(HostError, match="refusing"):
        safe_rmtree(tmp_path / "t")
    assert (tmp_path / "t" / "dev").is_dir()
    monkeypatch.undo()
    safe_rmtree(tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_resolve_in_root_keeps_absolute_links_inside(tmp_path: Path) -> None:
    (tmp_path / "usr" / "lib" / "x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "usr" / "lib" / "x86_64-linux-gnu" / "ld.so").write_text("tree's")
    (tmp_path / "usr" / "lib64").mkdir()
    os.symlink("/usr/lib/x86_64-linux-gnu/ld.so", tmp_path / "usr" / "lib64" / "ld.so")
    os.symlink("usr/lib64", tmp_path / "lib64")
    os.symlink("usr/lib", tmp_path / "lib")
    got = resolve_in_root(tmp_path, "/lib64/ld.so")
    assert got == tmp_path / "usr" / "lib" / "x86_64-linux-gnu" / "ld.so"
    assert resolve_in_root(tmp_path, "/lib/../lib/x86_64-linux-gnu/ld.so") == got
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(HostError, match="too many"):
        resolve_in_root(tmp_path, "/loop")


def test_parse_qemu_version() -> None:
    v = parse_qemu_version(
        "QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)\nCopyright (c) 2003-2025\n"
    )
    assert (v.major, v.minor, v.micro) == (11, 1, 3)
    assert str(v) == "11.1.3"
    assert v.text.startswith("QEMU emulator version 11.1.3")
    assert QemuVersion(10, 0, 13) < QemuVersion(10, 1, 0) < v
    assert parse_qemu_version("QEMU emulator version 10.1").micro == 0
    with pytest.raises(prov.ProvisionError):
        parse_qemu_version("qemu-img version 8")


def fake_tree(root: Path) -> None:
    """The parts of a trixie tree that qemu_command and load_tree look at."""
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "qemu-system-x86_64").write_text("")
    (root / "usr" / "lib" / "x86_64-linux-gnu").mkdir(parents=True)
    (root / "usr" / "lib" / "x86_64-linux-gnu" / "ld-linux-x86-64.so.2").write_text("")
    (root / "usr" / "lib64").mkdir()
    os.symlink(
        "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        root / "usr" / "lib64" / "ld-linux-x86-64.so.2",
    )
    os.symlink("usr/lib64", root / "lib64")
    os.symlink("usr/lib", root / "lib")


def test_qemu_command_uses_the_trees_loader_and_data(tmp_path: Path) -> None:
    fake_tree(tmp_path)
    argv = qemu_command(tmp_path)
    assert argv[0].endswith("env")
    assert argv[1] == f"QEMU_MODULE_DIR={tmp_path}/usr/lib/x86_64-linux-gnu/qemu"
    # The absolute symlink was resolved inside the tree, not on the host.
    assert argv[2] == f"{tmp_path}/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    assert argv[3:5] == [
        "--library-path",
        f"{tmp_path}/usr/lib/x86_64-linux-gnu:{tmp_path}/lib/x86_64-linux-gnu",
    ]
    assert argv[5] == f"{tmp_path}/usr/bin/qemu-system-x86_64"
    assert argv[6:] == ["-L", f"{tmp_path}/usr/share/qemu", "-L", f"{tmp_path}/usr/share/seabios"]


def write_marker(root: Path, **overrides: object) -> None:
    meta: dict[str, object] = {
        "format": 1,
        "qemu_version_text": "QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)",
        "package_version": "1:11.1.3+ds-1~bpo13+1",
    }
    meta.update(overrides)
    (root / prov.MARKER).write_text(json.dumps(meta))


def test_load_tree_needs_marker_and_binaries(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    assert load_tree(tree) is None
    fake_tree(tree)
    assert load_tree(tree) is None  # no marker: an interrupted install
    write_marker(tree, format=0)
    assert load_tree(tree) is None
    write_marker(tree)
    found = load_tree(tree)
    assert found is not None
    assert str(found.version) == "11.1.3"
    assert found.package_version == "1:11.1.3+ds-1~bpo13+1"
    (tree / "usr" / "bin" / "qemu-system-x86_64").unlink()
    assert load_tree(tree) is None


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("DEVMODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_not_root_without_tree_says_what_to_run(
    monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    monkeypatch.setattr(prov, "is_root", lambda: False)
    with pytest.raises(
        NeedsRootError, match=r"sudo env DEVMODEL_CACHE=.* -m vmm_client\.qemu provision"
    ):
        provision(log=quiet)
    fake_tree(cache / "qemu-trixie")
    write_marker(cache / "qemu-trixie")
    assert provision(log=quiet).path == cache / "qemu-trixie"  # a finished tree needs no root


def fake_install(fail: bool = False) -> object:
    def install(partial: Path, steps: Steps, log: object) -> None:
        fake_tree(partial)
        if fail:
            raise HostError("apt-get failed (fake)")

    return install


def test_install_commits_by_rename_and_an_interrupted_one_is_never_used(
    monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    monkeypatch.setattr(prov, "is_root", lambda: True)
    monkeypatch.setattr(
        prov, "check_qemu", lambda tree: parse_qemu_version("QEMU emulator version 11.1.3")
    )
    monkeypatch.setattr(prov, "_package_version", lambda tree, steps: "1:11.1.3-fake")
    tree = cache / "qemu-trixie"
    partial = cache / ".qemu-trixie.partial"

    monkeypatch.setattr(prov, "_install_into", fake_install(fail=True))
    with pytest.raises(HostError, match="fake"):
        provision(log=quiet)
    assert not tree.exists()
    assert partial.is_dir()  # left for inspection, never mistaken for a tree
    assert load_tree(tree) is None

    monkeypatch.setattr(prov, "_install_into", fake_install())
    got = provision(log=quiet)
    assert got.path == tree
    assert got.package_version == "1:11.1.3-fake"
    assert not partial.exists()
    meta = json.loads((tree / prov.MARKER).read_text())
    assert meta["qemu_version"] == "11.1.3"
    assert meta["suite"] == "trixie-backports"

    # force: a failed rebuild leaves the old tree in place.
    monkeypatch.setattr(prov, "_install_into", fake_install(fail=True))
    with pytest.raises(HostError):
        provision(force=True, log=quiet)
    assert load_tree(tree) is not None
    monkeypatch.setattr(prov, "_install_into", fake_install())
    (tree / "old-file").write_text("")
    provision(force=True, log=quiet)
    assert not (tree / "old-file").exists()
    assert not (cache / ".qemu-trixie.old").exists()


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_failed_install_unmounts_before_anything_else(
    monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    partial = cache / ".qemu-trixie.partial"

    def debootstrap_that_mounts(steps: Steps) -> str:
        # Like a debootstrap that dies after mounting proc in the target.
        (partial / "proc").mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "devmodel-test", str(partial / "proc")], check=True)
        (partial / "proc" / "on-the-mount").write_text("")
        return "/bin/false"

    monkeypatch.setattr(prov, "_ensure_debootstrap", debootstrap_that_mounts)
    try:
        with pytest.raises(HostError, match="/bin/false failed"):
            provision(log=quiet)
        assert mounts_under(cache) == []
        assert not (partial / "proc" / "on-the-mount").exists()
        assert load_tree(cache / "qemu-trixie") is None
    finally:
        unmount_all_under(cache)


@pytest.mark.parametrize(
    ("answers", "needle"),
    [
        ({"--version": "QEMU emulator version 7.2.0 (Debian 1:7.2+dfsg-7)"}, "older than 10.1"),
        (
            {"--version": "QEMU emulator version 10.1.0", "-device": "Device not found"},
            "no usable vfio-user-pci",
        ),
    ],
)
def test_a_qemu_too_old_or_without_vfio_user_is_refused_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, answers: dict[str, str], needle: str
) -> None:
    def fake_run(tree: object, args: list[str], timeout: float = 60) -> str:
        return answers[args[0]]

    monkeypatch.setattr(prov, "_run_qemu", fake_run)
    with pytest.raises(prov.ProvisionError, match=needle):
        prov.check_qemu(tmp_path)
