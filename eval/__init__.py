"""Frozen-encoder evaluation. Two layers, so no protocol imports another:

shared (import nothing from eval):

* :mod:`eval.features`: the train/val folders, raw-pixel transform, class-token extraction,
  the feature cache;
* :mod:`eval.classify`: the weighted k-NN vote and top-k accuracy;
* :mod:`eval.report`: the ``--weights | --random-init | --pixels`` source, weights hash, JSON,
  TensorBoard scalars;
* :mod:`eval.subsets`: balanced, seeded subset files (``class_dir/filename`` lines);
* :mod:`eval.cyanure_solver`: the reference's cyanure solver, run in a child process;

protocols (import only the shared modules):

* :mod:`eval.logistic`: few-shot logistic regression, the MSN reference protocol;
* :mod:`eval.knn`: weighted k-NN (the DINO protocol);
* :mod:`eval.linear`: a linear layer trained with SGD, the paper's protocol, data parallel;
* :mod:`eval.knn_monitor`: k-NN accuracy of the target encoder while pretraining runs.
"""
