"""Former home of the `tpp train` recipes, kept so that ``from tpp.train.recipes import ...`` goes on working: the
one recipe type and every recipe now live in :mod:`tpp.recipes` (``TrainRecipe`` is :class:`tpp.recipes.Recipe`)."""
from ..recipes import RECIPES, RESNET50_SETTINGS, Recipe, get_recipe, list_recipes, recipe_from_dict

TrainRecipe = Recipe

__all__ = ["TrainRecipe", "RECIPES", "get_recipe", "list_recipes", "recipe_from_dict", "RESNET50_SETTINGS"]
