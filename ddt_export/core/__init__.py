"""Torch-free, framework-free foundations every stage shares (see ddt_export/__init__.py for the layers)."""
