"""Mensajero's public REST API: users, devices, sending and reading messages."""
