"""The wires: transports that carry shmrpc's messages (installed as ``shmrpc.backends``).

Each backend implements `shmrpc.transport.Transport` and imports nothing else of the
engine. They register under the ``shmrpc.backends`` entry point group, exactly as a
third-party backend would:

* ``shm``  — rings in shared memory between workers on one host;
* ``tcp``  — sockets, for workers on several hosts;
* ``auto`` — shm to peers on this host, tcp to the others.
"""
