"""Cluster profiles shipped with asbatch (package data: `*.yaml`, read by asbatch.spec.resources)."""
