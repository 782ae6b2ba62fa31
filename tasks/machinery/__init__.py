"""What the stages share: the artifact store and the cached-unit decorator, the training
loop and its worker process, device choice, model loading, datasets, progress and reports."""
