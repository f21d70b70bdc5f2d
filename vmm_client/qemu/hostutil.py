"""Host-side helpers shared by the QEMU provisioner and the guest image builder.

The cache root, step lines with timings, logged subprocess runs, an exclusive
file lock, and the mount-table checks that make deleting a chroot safe. None
of this touches the host at import time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TextIO

# A PATH that finds debootstrap, chroot and mount whatever the caller's PATH
# is (a venv's bin directory first, or a non-login root shell without sbin).
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Log = Callable[[str], None]


class HostError(RuntimeError):
    """A host-side step failed; the message says which and where its log is."""


class NeedsRootError(HostError):
    """The step needs root and the caller is not; the message says what to run."""


def is_root() -> bool:
    return os.geteuid() == 0


def cache_root() -> Path:
    """`$DEVMODEL_CACHE`, else `$XDG_CACHE_HOME/devmodel`, else `~/.cache/devmodel`."""
    override = os.environ.get("DEVMODEL_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "devmodel"


def which(name: str) -> str | None:
    return shutil.which(name, path=SYSTEM_PATH + os.pathsep + os.environ.get("PATH", ""))


def default_log(line: str) -> None:
    print(line, flush=True)


class Steps:
    """Prints one line per step with its wall time, and keeps the tools' output in a log file.

    The tools (debootstrap, apt) are chatty; the user sees a short line per
    step, and on failure the tail of the log plus its path.
    """

    def __init__(self, prefix: str, log_path: Path, log: Log = default_log) -> None:
        self.prefix = prefix
        self.log_path = log_path
        self.log = log
        self.started = time.monotonic()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = log_path.open("a", encoding="utf-8")
        self._file.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {prefix} =====\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def note(self, text: str) -> None:
        self.log(f"[{self.prefix}] {text}")
        self._file.write(f"# {text}\n")
        self._file.flush()

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        t0 = time.monotonic()
        self.log(f"[{self.prefix}] {title} ...")
        self._file.write(f"# step: {title}\n")
        self._file.flush()
        try:
            yield
        except BaseException:
            self.log(f"[{self.prefix}] {title}: FAILED after {time.monotonic() - t0:.1f} s")
            raise
        self.log(f"[{self.prefix}] {title}: done in {time.monotonic() - t0:.1f} s")

    def total(self) -> float:
        return time.monotonic() - self.started

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        """Runs argv with stdout and stderr appended to the log; raises HostError on failure."""
        rc, _ = self._run(argv, env=env, cwd=cwd, capture=False)
        if rc != 0:
            raise self._failed(argv, rc)

    def capture(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> str:
        """Runs argv and returns its stdout; stderr goes to the log."""
        rc, out = self._run(argv, env=env, cwd=None, capture=True)
        if rc != 0:
            raise self._failed(argv, rc)
        return out

    def _failed(self, argv: Sequence[str], rc: int) -> HostError:
        return HostError(
            f"{argv[0]} failed with exit status {rc}: {' '.join(argv)}\n"
            f"--- last lines of {self.log_path} ---\n{tail(self.log_path)}"
        )

    def _run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None,
        cwd: Path | None,
        capture: bool,
    ) -> tuple[int, str]:
        self._file.write(f"$ {' '.join(argv)}\n")
        self._file.flush()
        # A session of its own, so that an interrupt stops the whole tree
        # (debootstrap runs dpkg in a chroot) before the caller unmounts it.
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else self._file,
            stderr=self._file if capture else subprocess.STDOUT,
            env=dict(env) if env is not None else tool_env(),
            cwd=cwd,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate()
        except BaseException:
            kill_process_group(proc)
            raise
        finally:
            self._file.flush()
        return proc.returncode, out or ""


def kill_process_group(proc: subprocess.Popen[str], grace: float = 10.0) -> None:
    """SIGTERM to proc's process group, then SIGKILL if it is still there after grace seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """While active, SIGTERM raises SystemExit, so `finally` blocks (unmounting) still run.

    Python's default for SIGTERM is to die on the spot. Only possible in the
    main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for apt, dpkg and debootstrap: non-interactive, C locale, system PATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        # A venv or a user's LD_* setting must not leak into Debian's tools.
        if not k.startswith(("LD_", "PYTHON", "VIRTUAL_ENV"))
    }
    env.update(
        PATH=SYSTEM_PATH,
        LC_ALL="C.UTF-8",
        LANG="C.UTF-8",
        DEBIAN_FRONTEND="noninteractive",
        DEBCONF_NONINTERACTIVE_SEEN="true",
    )
    if extra:
        env.update(extra)
    return env


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def file_lock(path: Path, log: Log | None = None) -> Iterator[None]:
    """An exclusive flock: two processes (pytest-xdist workers) never build the same tree."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None:
                log(f"waiting for the lock {path} (another build is running)")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _unescape_mount_field(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo octal.
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path: Path, mounts_text: str | None = None) -> list[str]:
    """Mount points at or below path, deepest first (the order to unmount them in)."""
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text(encoding="utf-8")
        except OSError:
            mounts_text = ""
    root = os.path.realpath(path) if path.exists() else os.path.abspath(path)
    found: list[str] = []
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        point = _unescape_mount_field(fields[1])
        if point == root or point.startswith(root.rstrip("/") + "/"):
            found.append(point)
    # Deeper first; a point mounted twice is listed twice and unmounted twice.
    return sorted(found, key=lambda p: (p.count("/"), len(p)), reverse=True)


def unmount_all_under(path: Path, log: Log | None = None) -> list[str]:
    """Unmounts everything at or below path; returns what is still mounted afterwards.

    Tries a plain umount first and falls back to a lazy one, which detaches
    the mount even when a process still has a file open in it.
    """
    umount = which("umount") or "umount"
    for point in mounts_under(path):
        proc = subprocess.run(
            [umount, point], capture_output=True, text=True, check=False, env=tool_env()
        )
        if proc.returncode != 0:
            if log is not None:
                log(f"umount {point} failed ({proc.stderr.strip()}); trying umount -l")
            subprocess.run([umount, "-l", point], capture_output=True, check=False, env=tool_env())
    return mounts_under(path)


def safe_rmtree(path: Path) -> None:
    """rm -rf that refuses a tree with anything mounted in it.

    A chroot has the host's /dev, /proc and /sys bound into it; deleting
    through those mounts would delete the host's device nodes.
    """
    if not path.exists() and not path.is_symlink():
        return
    still = mounts_under(path)
    if still:
        raise HostError(
            f"refusing to delete {path}: still mounted: {', '.join(still)}; "
            f"unmount them (umount -l) first"
        )
    shutil.rmtree(path)


def dir_size(path: Path) -> int:
    """Bytes used by the regular files under path (symlinks not followed, hardlinks once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += st.st_blocks * 512
    return total


def resolve_in_root(root: Path, path: str, *, max_links: int = 40) -> Path:
    """Resolves path (absolute, as seen inside root) to a host path, following links inside root.

    Symlinks in a chroot or an unpacked .deb are absolute *inside* that root
    (usr/lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/...); following
    them on the host would silently pick the host's file instead.
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            links += 1
            if links > max_links:
                raise HostError(f"too many symlinks resolving {path} in {root}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)
