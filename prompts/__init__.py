"""The default prompt templates (edit the .md files here); installed as the package `worker.templates`."""
