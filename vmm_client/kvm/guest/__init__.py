"""The freestanding guest test program and its build."""
