"""Fusion strategies by name: the explicit method table lives in `methods/registry.py`.

A method turns a Context (workspace, experts, validated options) into a `Prepared`
forward (batch -> logits), and may fit something first (`methods/method.py`). Importing
this package imports nothing: `from lorafuse.methods.registry import METHODS, resolve`.
"""
