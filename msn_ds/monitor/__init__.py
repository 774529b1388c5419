"""What a run reports about itself; import the modules by their full path.

* ``progress``: console progress, metrics.jsonl and TensorBoard scalars (rank 0).
* ``flops``: model FLOPs of a step from its token counts, accelerator peaks, MFU.
* ``views_grid``: a grid of a few samples' views and step-0 masks, as the encoders see them.
* ``table``: the fixed-width tables of the benchmarks and the evaluations.
"""
