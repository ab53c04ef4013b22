"""Pack recipes (installed as edge_genarm.models): one folder per pack, `<name>-pack/recipe.toml`."""
