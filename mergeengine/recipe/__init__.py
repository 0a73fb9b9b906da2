"""Recipes: the YAML schema (``schema``), the shared step fields (``step``) and loading with line numbers (``loader``)."""

from __future__ import annotations
