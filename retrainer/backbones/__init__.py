"""Backbones: pretrained image models whose pooled output is the bottleneck."""
from .registry import BackboneSpec, get_spec, is_backbone, list_backbones, register, unregister

__all__ = ["BackboneSpec", "get_spec", "is_backbone", "list_backbones", "register", "unregister"]
