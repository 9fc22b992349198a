import socket

from mensajero_common.testing import FREE_PORT_MIN, _ephemeral_start, free_port


def test_free_port_below_ephemeral_range() -> None:
    ports = {free_port() for _ in range(20)}

    for port in ports:
        assert FREE_PORT_MIN <= port < _ephemeral_start()
        # Free: a server can bind it.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    # Drawn at random, so parallel tests rarely draw the same one.
    assert len(ports) > 1
