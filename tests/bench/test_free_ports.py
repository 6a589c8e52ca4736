"""Peers and the load benchmark's trivial server take several ports at once (HTTP, gRPC,
management): each must be a different one, or a server answers another's protocol."""

import socket

from cellserve.bench.peers.base import free_ports


def test_ports_asked_for_together_are_different_and_free():
    for _ in range(50):
        ports = free_ports(5)
        assert len(set(ports)) == 5
    sockets = []
    try:
        for port in ports:
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", port))
    finally:
        for s in sockets:
            s.close()
