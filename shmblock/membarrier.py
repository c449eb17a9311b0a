"""``membarrier(2)`` and ``futex(2)`` through ``ctypes``: the two syscalls the freeze needs.

The freeze (:mod:`shmblock.freeze`) is a Dekker-style handshake between the freezer and
every writer: each side stores its own word, then loads the other's. x86-64 (TSO) may
let a load overtake an earlier store of the same thread (the store waits in the store
buffer), so without a full fence on *both* sides each can miss the other's store.
numpy has no fence, and a fence per guest write (``mfence``, a locked instruction, or a
syscall) would cost every write. ``membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)`` moves
the writers' fence to the freezer: the kernel runs a full memory barrier on every CPU
that runs a thread of a process registered with
``MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED`` (writers register once, when they attach)
before it returns; a thread that is not running has passed the scheduler's own barrier
when it was switched out. See ``membarrier(2)`` and the kernel's
``Documentation/scheduler/membarrier.rst``.

The futex is how a writer that met a freeze sleeps until the thaw, without polling:
``FUTEX_WAIT`` on the freeze word (a shared mapping, so the futex is keyed by the page
and works across processes: the *non-private* operations), ``FUTEX_WAKE`` from the
freezer when it clears the word. Every wait has a timeout and its caller re-checks the
word, so a lost wake costs at most one timeout slice.

Errors: :class:`MembarrierUnavailable` (a :class:`~shmblock.errors.DeviceError`) names
what is missing — the syscall (``ENOSYS``: a kernel built without
``CONFIG_MEMBARRIER``), the command (``EINVAL``: before Linux 4.16), or the permission
(``EPERM``: a seccomp filter, as some container runtimes install).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

from shmblock.errors import DeviceError

#: x86-64 syscall numbers (``asm/unistd_64.h``); shmblock runs on x86-64 only
#: (:func:`shmblock.device.check_memory_ordering`).
SYS_FUTEX = 202
SYS_MEMBARRIER = 324

# linux/membarrier.h
MEMBARRIER_CMD_QUERY = 0
MEMBARRIER_CMD_GLOBAL = 1
MEMBARRIER_CMD_GLOBAL_EXPEDITED = 2
MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED = 4

# linux/futex.h (not the _PRIVATE variants: the word is shared between processes)
FUTEX_WAIT = 0
FUTEX_WAKE = 1

#: the commands the freeze uses, as a QUERY mask
NEEDED = (1 << MEMBARRIER_CMD_GLOBAL_EXPEDITED) | (1 << MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED)


class MembarrierUnavailable(DeviceError):
    """The kernel does not offer the membarrier commands the freeze relies on."""


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc: ctypes.CDLL | None = None


def _syscall() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    """libc's ``syscall``; a CDLL function releases the GIL while it runs."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = _libc.syscall
    fn.restype = ctypes.c_long
    return fn


def _explain(err: int, what: str) -> MembarrierUnavailable:
    if err == errno.ENOSYS:
        why = "the kernel has no membarrier system call (built without CONFIG_MEMBARRIER)"
    elif err == errno.EINVAL:
        why = "the kernel does not know this membarrier command (Linux 4.16 or later needed)"
    elif err == errno.EPERM:
        why = "membarrier is not permitted here (a seccomp filter, as in some containers?)"
    else:
        why = os.strerror(err)
    return MembarrierUnavailable(
        f"{what}: {why}. shmblock's freeze needs membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED) "
        "to order the writers' 'in a write' stores against the freeze word without a "
        "fence in every guest write")


def _membarrier(cmd: int, what: str) -> int:
    if platform.machine() not in ("x86_64", "amd64", "AMD64"):
        raise MembarrierUnavailable(f"{what}: the syscall numbers here are x86-64's")
    ret = int(_syscall()(ctypes.c_long(SYS_MEMBARRIER), ctypes.c_int(cmd), ctypes.c_uint(0),
                         ctypes.c_int(0)))
    if ret < 0:
        raise _explain(ctypes.get_errno(), what)
    return ret


def query() -> int:
    """The mask of membarrier commands this kernel supports (``MEMBARRIER_CMD_QUERY``)."""
    return _membarrier(MEMBARRIER_CMD_QUERY, "membarrier query")


_checked = False
_registered = False


def require() -> None:
    """Raise MembarrierUnavailable unless the commands the freeze needs are there.

    Checked once per process (the answer cannot change while it runs).
    """
    global _checked
    if _checked:
        return
    mask = query()
    if mask & NEEDED != NEEDED:
        raise MembarrierUnavailable(
            f"this kernel's membarrier supports commands {mask:#x}, not the global "
            "expedited ones the freeze needs (Linux 4.16 or later; MEMBARRIER_CMD_QUERY)")
    _checked = True


def register() -> None:
    """Register this process for global expedited barriers (every writer, once)."""
    global _registered
    if not _registered:
        _membarrier(MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED,
                    "membarrier registration")
        _registered = True


def barrier() -> None:
    """A full memory barrier on every running thread of every registered process."""
    _membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED, "membarrier")


def futex_wait(address: int, expected: int, timeout: float) -> None:
    """Sleep while the 32-bit word at ``address`` holds ``expected``, at most ``timeout`` s.

    Returns on a wake, a change of the word (also one made before the call: ``EAGAIN``),
    the timeout or a signal; the caller re-checks the word in every case.
    """
    ts = _Timespec(int(timeout), int((timeout % 1) * 1e9))
    _syscall()(ctypes.c_long(SYS_FUTEX), ctypes.c_void_p(address), ctypes.c_int(FUTEX_WAIT),
               ctypes.c_uint32(expected & 0xFFFFFFFF), ctypes.byref(ts), None, ctypes.c_int(0))


def futex_wake(address: int, count: int = 0x7FFFFFFF) -> int:
    """Wake up to ``count`` waiters on the word at ``address``; returns how many woke."""
    ret = int(_syscall()(ctypes.c_long(SYS_FUTEX), ctypes.c_void_p(address),
                         ctypes.c_int(FUTEX_WAKE), ctypes.c_int(count), None, None,
                         ctypes.c_int(0)))
    return max(ret, 0)
