"""The pipeline's Prefect tasks.

- `config`: the one typed pipeline config (`PipelineConfig`; which fields decide no artifact
  is marked on the fields, `RUN_ONLY`), its key, and the `Runtime` every stage may read.
- `presets`: the preset names and what each decides beyond the model.
- `stage`: how a stage is declared (`Stage`, its config slice `Settings`, its inputs `Needs`).
- `manifests`: what every stage output is (`Manifest`, `RootURL`), and a trained model's summary.
- `stages/`: one module per stage: its declaration, its output's manifest type and readers,
  its checks, its tasks and what it publishes; `stages.STAGES` in run order.
- `machinery/`: what stages are built from: artifacts and the cached-unit decorator, the
  training loop and its processes, devices, models, progress and UI artifacts.
- `runs`: which config made which report (`vqvae2 ls`).
- `fidelity`: sample-quality metrics through torch-fidelity (no Prefect).
"""
