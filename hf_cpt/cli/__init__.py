"""The `hf-cpt` command line (Typer). Every command calls the public Python API."""
