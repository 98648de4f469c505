"""Teachers for distillation: finding, training or loading them (load.py, recipe.py) and caching their outputs."""
