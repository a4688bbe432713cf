"""Training, evaluation and data: synthetic degradations, losses, photos and the training loop.

Kept apart from the serving path (`model.arch`, `model.inference`, `model.engine`): the service
never imports this package.
"""
