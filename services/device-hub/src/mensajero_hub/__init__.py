"""The device-hub: keeps every phone's connection, pushes tasks and records reports."""
