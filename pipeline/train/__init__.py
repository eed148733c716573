"""Train stage: MONAI networks, DiceCE loss, checkpoints and a self-contained model folder."""
