"""The mathematics of a step: the train and evaluation steps, losses, metrics, optimization, strategy,
the built-in models and the model's signature. Nothing here reads or writes files."""
