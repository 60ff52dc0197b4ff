"""Constants shared by the data pipeline, the model and the hooks."""

IGNORE_INDEX = -100
DEFAULT_PAD_TOKEN_INDEX = 0
DEFAULT_IMAGE_TOKEN = "<image>"

# Optional top-level settings (validation's one-line forms, sequence parallelism) that ``--cfg-options`` may add
# to a config that does not set them; any other name must already be a setting of the file.
ADDABLE_SETTINGS = frozenset({"val_dataset", "val_split", "val_interval", "val_before_train", "save_best",
                              "early_stopping", "sequence_parallel_size"})
