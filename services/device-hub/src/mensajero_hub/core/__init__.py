"""The transport-independent core of the device-hub.

- `state`, `heartbeat`, `frames`: per-connection state, silence deadlines and replies,
  plain code without I/O.
- `repository` (SQL), `presence` (the connection key in Redis), `channels` (the shared
  pub/sub connection) and `service` (the work behind each frame).
- `session`: one connection's frame handling over any `Transport`; `hub`: the process
  with its resources and every open session.
"""
