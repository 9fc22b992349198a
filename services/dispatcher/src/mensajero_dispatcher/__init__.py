"""The dispatcher: assigns pending messages to devices and keeps them in flight.

One process runs the stream consumer (new messages and device presence events) and the
periodic jobs side by side; several replicas may run at once.
"""
