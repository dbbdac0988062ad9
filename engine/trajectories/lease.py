"""Who trains which expert: a lease file per running expert, renewed with every saved epoch.

Two jobs (or two Ray trials) on one store share the work: an expert is claimed by writing
``partial/expert-XXXXX/lease.json`` ({owner, heartbeat}); a lease whose owner has been silent for
``lease_timeout_s``, or whose owner was a process on this host that no longer runs, may be taken over.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from engine import storage
from engine.errors import EngineError, StorageError
from engine.storage import StorageConfig

DEFAULT_LEASE_TIMEOUT_S = 600.0


class LeaseLost(EngineError):
    """Another writer holds a fresh lease on the expert this writer is working on."""


class Lease(BaseModel):
    model_config = ConfigDict(extra="forbid")

    owner: str
    heartbeat: float = Field(description="Unix time of the owner's last renewal.")


def default_owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str) -> bool:
    """True when ``owner`` (from default_owner) was a process on this host that no longer runs.

    Lets a job rerun right after a crash or SIGKILL take over its own experts at once instead of
    waiting for the lease to time out. Owners on other hosts are judged by the timeout alone.
    """
    parts = owner.rsplit("-", 2)  # host (may contain '-'), pid, random suffix
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Leases:
    """The leases of one store, held as ``owner``."""

    def __init__(self, url_of: Callable[[int], str], storage_config: StorageConfig | None, owner: str | None = None,
                 timeout_s: float = DEFAULT_LEASE_TIMEOUT_S):
        self.url_of = url_of  # expert id -> URL of its lease file
        self.storage_config = storage_config
        self.owner = owner or default_owner()
        self.timeout_s = timeout_s

    def read(self, expert_id: int) -> Lease | None:
        try:
            return Lease.model_validate(storage.read_json(self.url_of(expert_id), self.storage_config))
        except StorageError:  # no lease file (or a half-visible one): nobody holds it
            return None

    def held_by_other(self, expert_id: int) -> bool:
        lease = self.read(expert_id)
        return (
            lease is not None
            and lease.owner != self.owner
            and time.time() - lease.heartbeat < self.timeout_s
            and not owner_is_dead(lease.owner)
        )

    def write(self, expert_id: int) -> None:
        lease = Lease(owner=self.owner, heartbeat=time.time())
        storage.write_json(self.url_of(expert_id), lease.model_dump(mode="json"), self.storage_config)

    def renew(self, expert_id: int) -> None:
        if self.held_by_other(expert_id):
            raise LeaseLost(f"{storage.redact(self.url_of(expert_id))}: expert {expert_id} was taken over by "
                            "another writer")
        self.write(expert_id)
