"""The I/O edge: host resources behind the protocols in devserver/ports.py."""
