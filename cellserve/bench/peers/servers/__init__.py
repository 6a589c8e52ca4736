"""Server programs that run inside the peers' own environments: each file is self-contained
(no cellserve import), copied into the peer's work directory or run by path."""
