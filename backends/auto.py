"""auto: shm to peers on this host, tcp to the others, chosen per peer.

A backend may be a preference list instead of a transport: for each peer the engine uses the
first transport in the list that reaches it (shm reaches peers with the same host domain, tcp
reaches everyone). Both ends of a pair decide alike from the addresses they exchanged.

Where shm cannot work at all (no writable /dev/shm for its doorbell semaphore, as in a
container started with a read-only or full /dev/shm, or no memfd_create), its address says
``unavailable`` and reaches nobody, so every peer on this host is reached over tcp instead;
the worker warns once (a ``RuntimeWarning`` naming the reason and the fix).
"""

PREFERENCE = ("shm", "tcp")
