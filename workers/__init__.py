"""Kafka consumers of the mesh."""
