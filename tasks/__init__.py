"""The pipeline's Prefect tasks.

- `config`: the one typed pipeline config (`PipelineConfig`) and the `Runtime` every stage may read.
- `stage`: how a stage is declared (`Stage`, its config slice `Settings`, its inputs `Needs`).
- `manifests`: the typed outputs the stages hand each other.
- `stages/`: one module per stage, each a declaration and its tasks; `stages.STAGES` in run order.
- `runtime/`: what stages share: artifacts and the cached-unit decorator, the training loop
  and its process, devices, models, datasets, progress and reports.
- `fidelity`: sample-quality metrics through torch-fidelity (no Prefect).
"""
