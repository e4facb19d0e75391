"""Workflow intake and queue service."""

__version__ = "0.1.0"
