"""`python -m edge_genarm`: the `edge-genarm` command line."""

from .cli import main

main(prog_name="edge-genarm")
