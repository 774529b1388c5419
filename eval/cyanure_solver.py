"""The reference's solver (cyanure) in a process of its own.

cyanure brings its own OpenMP runtime; in the same process as torch's MKL the two deadlock
in torch's next threaded LAPACK call (seen with cyanure 1.2.2 and torch 2.14, even with
cyanure single-threaded). So :func:`eval.logistic.evaluate_fewshot` runs it here, in a child
that imports only numpy and cyanure:

    python -m eval.cyanure_solver IN.npz OUT.npy   # IN: train_x, train_y, test_x, lambd
"""
from __future__ import annotations

import sys

import numpy as np


def predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
            lambd: float) -> np.ndarray:
    """Fit ``MultiClassifier(multiclass-logistic, l2, no intercept)`` with ``lambd`` (already
    divided by n) and predict ``test_x``: the reference's call, cyanure 1.x or 0.2 API."""
    train_x = np.ascontiguousarray(train_x, np.float64)
    test_x = np.ascontiguousarray(test_x, np.float64)
    train_y = np.asarray(train_y, np.int64)
    try:  # cyanure >= 1.0: scikit-learn style estimator, the same objective
        from cyanure.estimators import Classifier
    except ImportError:  # the API logistic_eval.py was written against (cyanure 0.2)
        import cyanure as cyan

        clf = cyan.MultiClassifier(loss="multiclass-logistic", penalty="l2", fit_intercept=False)
        clf.fit(train_x, train_y, it0=10, lambd=lambd, lambd2=lambd, nthreads=-1, tol=1e-3,
                solver="auto", seed=0, max_epochs=300)
    else:
        clf = Classifier(loss="multiclass-logistic", penalty="l2", lambda_1=lambd,
                         fit_intercept=False, tol=1e-3, max_iter=300, verbose=False,
                         random_state=0)
        clf.fit(train_x, train_y)
    return np.asarray(clf.predict(test_x)).astype(np.int64)


def main(argv=None) -> int:
    src, dst = (argv or sys.argv[1:])[:2]
    with np.load(src, allow_pickle=False) as z:
        pred = predict(z["train_x"], z["train_y"], z["test_x"], float(z["lambd"]))
    np.save(dst, pred)
    return 0


if __name__ == "__main__":
    sys.exit(main())
