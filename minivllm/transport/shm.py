"""Named OS resources of the transport: shared-memory ring segments and ZeroMQ ipc:// socket
files. Unique names, owner-only access, cleanup on every exit path.

Names are `mvl_<creator pid>_<random>_<role>`, so a process starting up can tell which segments
belong to processes that no longer exist and unlink them (`cleanup_stale`); socket files and
private directories in SOCKET_DIR follow the same scheme. Segments are created
by `multiprocessing.shared_memory` with mode 0600. The creating side unlinks on close; its
resource tracker also unlinks them if the creator is killed. The attaching side is kept out of
its own resource tracker, which would otherwise unlink a segment it does not own when it exits.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from multiprocessing import resource_tracker, shared_memory

from minivllm._cext.ring import HEADER_BYTES, Ring

PREFIX = "mvl_"
SHM_DIR = "/dev/shm"
# Socket files live in a 0700 directory of this user: zmq creates them with the umask's mode.
SOCKET_DIR = os.path.join(tempfile.gettempdir(), f"minivllm-{os.getuid()}")
_NAME = re.compile(rf"^{PREFIX}(\d+)_[0-9a-f]+_\w+?(\.sock)?$")


def segment_name(role: str) -> str:
    return f"{PREFIX}{os.getpid()}_{secrets.token_hex(4)}_{role}"


def socket_dir() -> str:
    """SOCKET_DIR, created 0700 if missing. One that exists must be a directory of this user
    with mode 0700, as OpenSSH demands of its control sockets' directory: another user's (or an
    open) directory could hold sockets planted to take our connections."""
    try:
        os.mkdir(SOCKET_DIR, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(SOCKET_DIR)
    problem = ("is not a directory" if not stat.S_ISDIR(st.st_mode)
               else f"is owned by uid {st.st_uid}, not by this user ({os.getuid()})"
               if st.st_uid != os.getuid()
               else f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0700"
               if stat.S_IMODE(st.st_mode) != 0o700 else None)
    if problem:
        raise PermissionError(f"refusing the socket directory {SOCKET_DIR}: it {problem}; "
                              f"remove it (a fresh one is made) or fix it with chown/chmod 0700")
    return SOCKET_DIR


def socket_endpoint(role: str) -> str:
    """A fresh ipc:// endpoint (a socket file only this user can reach, in SOCKET_DIR)."""
    socket_dir()
    return f"ipc://{os.path.join(SOCKET_DIR, segment_name(role))}.sock"


def private_dir(role: str) -> str:
    """A fresh directory in SOCKET_DIR, named like the segments: a later start removes it if
    its creator dies without doing so."""
    path = os.path.join(socket_dir(), segment_name(role))
    os.mkdir(path, 0o700)
    return path


def create_ring(role: str, capacity: int) -> Ring:
    """A fresh ring of `capacity` data bytes (a power of two) in a new 0600 segment."""
    if capacity < 64 or capacity & (capacity - 1):
        raise ValueError(f"ring capacity must be a power of two >= 64, got {capacity}")
    shm = _open(segment_name(role), HEADER_BYTES + capacity)
    try:
        return Ring(shm, create=True)
    except BaseException:
        shm.close()
        unlink_segment(shm.name)
        raise


def attach_ring(name: str) -> Ring:
    """The ring in existing segment `name`, opened by a process that does not own it."""
    if not _NAME.match(name):
        raise ValueError(f"{name!r} is not a minivllm ring segment name")
    shm = _open(name)
    try:
        return Ring(shm)
    except BaseException:
        shm.close()
        raise


def _open(name: str, create_size: int = 0) -> shared_memory.SharedMemory:
    """Open (or create, 0600) a segment that no resource tracker watches. The tracker is shared
    by every process a parent spawns, so its bookkeeping of a segment that one process creates
    and another attaches goes wrong; the transport unlinks its segments itself, the engine
    those of a frontend that died, and `cleanup_stale` those of any dead process."""
    create = create_size > 0
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name, create=create, size=create_size, track=False)
    shm = shared_memory.SharedMemory(name, create=create, size=create_size)
    resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001
    return shm


def unlink_segment(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHM_DIR, name))


def remove_endpoint(endpoint: str) -> None:
    """Delete an ipc:// endpoint's socket file (ZeroMQ leaves it behind)."""
    if endpoint.startswith("ipc://"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(endpoint[len("ipc://"):])


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


def list_segments(pid: int | None = None, directory: str = SHM_DIR) -> list[str]:
    """Our segments in /dev/shm, or socket files in `directory` (those of `pid` only, if given)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if (m := _NAME.match(n))
                  and (pid is None or int(m.group(1)) == pid))


def cleanup_stale() -> list[str]:
    """Remove the segments, socket files and private directories whose creating process is
    gone; returns their names."""
    removed = []
    for directory in (SHM_DIR, SOCKET_DIR):
        for name in list_segments(directory=directory):
            if not pid_alive(int(_NAME.match(name).group(1))):
                path = os.path.join(directory, name)
                with contextlib.suppress(FileNotFoundError):  # removed by someone else first
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    else:
                        os.unlink(path)
                    removed.append(name)
    return removed
