"""DeepSpeed's conversion to the universal checkpoint format, with restricted unpickling.

    python -m msn_ds.io.to_universal --input_folder DIR/global_stepN --output_folder OUT ...

takes the arguments of ``python -m deepspeed.checkpoint.ds_to_universal``, which reads every
optimizer-state file with full unpickling. Here every ``torch.load`` is weights-only under
``msn_ds.io.safe_load.allowed_globals`` first (``plan_resume`` runs this when the world size
changes). A refused file: ``error: <file>: refused to load: ...`` on stderr, exit 2.
"""
import runpy
import sys

if __name__ in ("__main__", "__mp_main__"):
    # Also on import as a spawned worker's main module (``__mp_main__``): the conversion
    # may extract shards in worker processes, and those must be restricted as well (forked
    # workers inherit it anyway).
    from msn_ds.io.safe_load import CheckpointError, restricted_loads

    _restriction = restricted_loads().__enter__()


def main() -> int:
    try:
        runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__",
                         alter_sys=True)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _restriction.refused:  # swallowed somewhere inside the conversion: still a failure
        print(f"error: {_restriction.refused[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
