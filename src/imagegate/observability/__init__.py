"""Metrics, the request log and the request tracking behind a graceful shutdown."""
