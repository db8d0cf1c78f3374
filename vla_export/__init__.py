"""vla-export: turn a vision-language-action policy checkpoint into measured, deployable artifacts."""

__version__ = "0.1.0"
