"""Byte layout of a device's metadata segment, and the meaning of its control words.

The metadata segment (``/<prefix>-<run>-<dev>-meta``) holds everything about a device
except its contents::

    offset 0      header (4 KiB): magic, version, geometry, run id, names; control words;
                  dirty-bitmap names
    then          in_write     one uint64 per writer, each on its own 64-byte line
                  (the freeze handshake, see shmblock.freeze)
                  needs_copy   one byte per cluster
                  allocated    one byte per cluster
                  saved        one byte per cluster
                  dirty[i]     one byte per cluster, for each of MAX_BITMAPS bitmaps
                  slot_state   one uint16 per copy-before-write buffer slot (FREE, FULL,
                               or HELD + w: reserved by writer w; shmblock.cbw_buffer)
                  slot_cluster one uint64 per buffer slot: which cluster it holds
                  stats        one row of uint64 words per writer (see shmblock.stats)
                  staging      the copy-before-write buffer: buffer_slots × cluster_size
                               bytes of saved old contents, shared by every writer

Every region starts on a 4 KiB boundary. The layout is a pure function of the geometry
in the header, so an attaching process recomputes it and checks the segment size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"SHMBLKv1"
# 2: one shared copy-before-write buffer (buffer_slots) instead of slots per writer
VERSION = 2
HEADER_SIZE = 4096
PAGE = 4096
MAX_BITMAPS = 8
BITMAP_NAME_BYTES = 64

# magic, version, header size, device size, cluster size, clusters, max writers,
# copy-before-write buffer slots, max bitmaps, flags, run id, data segment name, backing file path
HEADER_FMT = "<8sIIQIQIIII16s128s1024s"
HEADER_STRUCT = struct.Struct(HEADER_FMT)
FLAG_FILE_BACKED = 1

CTL_OFFSET = 2048
CTL_WORDS = 64
BITMAP_NAMES_OFFSET = CTL_OFFSET + CTL_WORDS * 8
assert HEADER_STRUCT.size <= CTL_OFFSET
assert BITMAP_NAMES_OFFSET + MAX_BITMAPS * BITMAP_NAME_BYTES <= HEADER_SIZE

# Control words: uint64 values in the header, read and written with single stores.
CTL_EPOCH = 0  # control hint: writers poll it and read their control queue on change
CTL_JOB_ACTIVE = 1  # 1 while a job may have needs_copy bits set
CTL_BROKEN = 2  # 1 when a guest write broke the snapshot (on-cbw-error=break-snapshot)
CTL_CBW_MODE = 3  # 0 = stage (writer saves old data itself), 1 = request (worker saves)
CTL_CBW_TIMEOUT_US = 4  # how long a guest write waits for copy-before-write
CTL_ON_CBW_ERROR = 5  # 0 = break-guest-write, 1 = break-snapshot
CTL_WORKER_IDLE = 6  # 1 while the backup worker sleeps: staging writers ring the doorbell
CTL_DONE_BYTES = 7  # job progress, written by the backup worker
CTL_TOTAL_BYTES = 8
CTL_HEARTBEAT_NS = 9  # CLOCK_MONOTONIC of the worker's last loop, for stuck detection
CTL_CBW_CLUSTERS = 10  # clusters saved by copy-before-write in this job
CTL_BITMAP_MASK = 11  # bit i set: dirty bitmap i is enabled and records guest writes
CTL_JOB_SEQ = 12  # incremented for every job started on the device
CTL_JOB_RELEASED = 13  # CTL_JOB_SEQ of the last job that ended needing no more saves
# Nonzero while a freeze is on (its low 32 bits are the futex word writers sleep on); word
# 16 starts a cache line of its own, away from the worker's progress and heartbeat words.
CTL_FREEZE = 16

#: bytes between two writers' in-write words: a cache line each, so one writer's stores
#: do not take the line away from another (false sharing on every write)
IN_WRITE_STRIDE = 64

# The copy-before-write buffer's per-job words (shmblock.cbw_buffer), kept at the far end
# of the control area, away from the words above. Reset by cbw_buffer.configure before
# the freeze; the HELD/FULL accounting words are only written under the buffer's lock.
CTL_BUF_LIMIT = 48  # slots this job may use (0: request path only)
CTL_BUF_PEAK = 49  # most slots held at once (under the lock)
CTL_BUF_FULL_NS = 50  # nanoseconds the buffer was full (under the lock)
CTL_BUF_FULL_SINCE_NS = 51  # CLOCK_MONOTONIC when it was last found full; 0: not full
CTL_BUF_FALLBACKS = 52  # saves that went the request path because it was full (lock)
CTL_BUF_SAVES = 53  # slots the backup worker drained (written by the worker only)

CBW_MODES = ("stage", "request")
ON_CBW_ERROR = ("break-guest-write", "break-snapshot")

SLOT_FREE = 0
SLOT_FULL = 1
SLOT_HELD = 2  # SLOT_HELD + w: reserved by writer w, not yet published


def _align(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True, slots=True)
class Layout:
    """Offsets of every region of the metadata segment for one geometry."""

    device_size: int
    cluster_size: int
    max_writers: int
    buffer_slots: int
    stats_words: int

    @property
    def clusters(self) -> int:
        return self.device_size // self.cluster_size

    @property
    def slots(self) -> int:
        return self.buffer_slots

    @property
    def map_bytes(self) -> int:
        return _align(self.clusters)

    @property
    def in_write_offset(self) -> int:
        return HEADER_SIZE

    @property
    def needs_copy_offset(self) -> int:
        return self.in_write_offset + _align(self.max_writers * IN_WRITE_STRIDE)

    @property
    def allocated_offset(self) -> int:
        return self.needs_copy_offset + self.map_bytes

    @property
    def saved_offset(self) -> int:
        return self.allocated_offset + self.map_bytes

    @property
    def dirty_offset(self) -> int:
        return self.saved_offset + self.map_bytes

    @property
    def slot_state_offset(self) -> int:
        return self.dirty_offset + MAX_BITMAPS * self.map_bytes

    @property
    def slot_cluster_offset(self) -> int:
        return self.slot_state_offset + _align(self.slots * 2)

    @property
    def stats_offset(self) -> int:
        return self.slot_cluster_offset + _align(self.slots * 8)

    @property
    def staging_offset(self) -> int:
        return self.stats_offset + _align(self.max_writers * self.stats_words * 8)

    @property
    def total_size(self) -> int:
        return self.staging_offset + _align(self.slots * self.cluster_size)
