"""Image-processing steps: plain functions plus thin Prefect task wrappers."""
