from deploycraft.cli import entrypoint

entrypoint()
