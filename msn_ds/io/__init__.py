"""Files in and out: what a run writes and what it reads back.

* ``checkpoint``: DeepSpeed training checkpoints (atomic save, keep-last-K, resume,
  consolidation) and the one-file weights we share;
* ``reference``: the reference implementation's ``.pth.tar`` checkpoints, import and export;
* ``safe_load``: weights-only unpickling of every checkpoint file (ours and DeepSpeed's);
* ``to_universal``: DeepSpeed's universal conversion run under that restriction.
"""
