"""Reconciliation with Anthropic's bill: its daily cost and usage reports against our own figures."""
