"""Data: TFDS builders (the synthetic arithmetic task, local prompt files) and batching.

Typical use::

    source = load_source("arithmetic", "train", data_dir)           # or a .jsonl/.parquet path
    batches = make_prompt_iterator(source, batch_size=8, seed=0)
    batch = next(batches)   # {"prompt": [8 x str], "answer": [8 x str], ...}
    state = batches.get_state()                                     # save beside the model
"""

from opd_jax.data.arithmetic import (
    Arithmetic,
    ArithmeticConfig,
    arithmetic_builder,
    arithmetic_config,
    generate_split,
    solution_steps,
    step_accuracy,
)
from opd_jax.data.loader import build, load_source, make_prompt_iterator, prompt_dataset
from opd_jax.data.prompts import (
    PromptFileError,
    PromptFiles,
    PromptFilesConfig,
    prompt_files_builder,
    read_prompt_file,
)

__all__ = [
    "Arithmetic",
    "ArithmeticConfig",
    "PromptFileError",
    "PromptFiles",
    "PromptFilesConfig",
    "arithmetic_builder",
    "arithmetic_config",
    "build",
    "generate_split",
    "load_source",
    "make_prompt_iterator",
    "prompt_dataset",
    "prompt_files_builder",
    "read_prompt_file",
    "solution_steps",
    "step_accuracy",
]
