"""Bringing models from other frameworks into capas run directories, and taking them back."""
