"""Files in and out: what a run writes and what it reads back.

* ``atomic``: the one atomic file writer (temporary file, fsync, rename; full-disk errors);
* ``weights``: the one-file weights we share, and metadata <-> encoder;
* ``checkpoint``: DeepSpeed training checkpoints: atomic save, resume, consolidation;
* ``reference``: the reference implementation's ``.pth.tar`` checkpoints, import and export;
* ``hf``: Hugging Face ``transformers`` ``ViTMSNModel`` folders, export and import;
* ``safe_load``: weights-only unpickling of every checkpoint file (ours and DeepSpeed's);
* ``to_universal``: DeepSpeed's universal conversion run under that restriction.
"""
