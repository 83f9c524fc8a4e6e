"""Coefficient providers ("mixers") for the fused layer."""

from lorafuse.mixers.static import Fixed, Learned, Uniform

__all__ = ["Fixed", "Learned", "Uniform"]
