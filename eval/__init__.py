"""Frozen-encoder evaluation: few-shot logistic regression, the MSN reference protocol.

* :mod:`eval.subsets` writes balanced, seeded subset files (``class_dir/filename`` lines);
* :mod:`eval.features` extracts class-token features from a frozen :class:`MSNEncoder`;
* :mod:`eval.logistic` fits the L2-regularised multinomial logistic regression and runs the
  ``python -m eval.logistic`` command line.
"""
