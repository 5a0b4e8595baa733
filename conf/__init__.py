"""Hydra configuration tree of sdlight (shipped inside the wheel as ``sdlight.conf``)."""
