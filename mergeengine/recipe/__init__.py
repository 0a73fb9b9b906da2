"""Recipe schema (pydantic, discriminated on ``op``) and YAML loading with line numbers."""

from mergeengine.recipe.loader import LoadedRecipe, load_recipe, parse_recipe
from mergeengine.recipe.schema import Recipe

__all__ = ["LoadedRecipe", "Recipe", "load_recipe", "parse_recipe"]
