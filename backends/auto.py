"""auto: shm to peers on this host, tcp to the others, chosen per peer.

A backend may be a preference list instead of a transport: for each peer the engine uses the
first transport in the list that reaches it (shm reaches peers with the same host domain, tcp
reaches everyone). Both ends of a pair decide alike from the addresses they exchanged.
"""

PREFERENCE = ("shm", "tcp")
