"""Parallel plans applied to the plain model of model/: device meshes, TP/SP, EP, PP, FSDP2 and
the vision plan. The model never imports this package; the trainer applies a plan to it."""
