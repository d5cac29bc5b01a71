"""The method's pure math (torch only): ELBO estimators, losses, advantages, samplers.

Nothing here imports the rest of the project, Ray, DeepSpeed or a model library; every
function is unit-tested on CPU against known answers (tests/unit).
"""
