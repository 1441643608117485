"""Alerts: threshold state and webhook delivery, the payloads each receiver gets, and digests of many scopes."""
