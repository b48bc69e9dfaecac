"""taskatlas building blocks: plain Python, no Ray or MLflow (those live in `pipelines/`)."""
