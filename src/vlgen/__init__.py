"""vlgen: language generation from images and video with a frozen LLM, components swapped in YAML."""

__version__ = "0.1.0"
