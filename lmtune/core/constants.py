"""Constants shared by the data pipeline, the model and the hooks."""

IGNORE_INDEX = -100
DEFAULT_PAD_TOKEN_INDEX = 0
DEFAULT_IMAGE_TOKEN = "<image>"
