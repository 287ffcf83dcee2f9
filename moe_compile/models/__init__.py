"""Checkpoint loading and the registry of supported families."""

from . import families as _families  # noqa: F401  (registers the families)
from .spec import FAMILIES, FamilySpec, Routing, family_for, supported_families

__all__ = ["FAMILIES", "FamilySpec", "Routing", "family_for", "supported_families"]
