"""data_shards: split parsing, index, clips, decoding, Ray Data datasets, feature cache, synth.

Everything between video files on disk and batches of clips on each Ray Train worker.
Import from the module that does the job (`data_shards.datasets`, `data_shards.features`,
...): the package itself imports nothing, so `data_shards.config` loads without Ray, pyarrow
or decord (a GPU box that only times the model needs torch and pydantic alone).
"""
