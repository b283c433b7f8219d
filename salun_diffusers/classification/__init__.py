"""SalUn for image classifiers, with the paper's baselines (Retrain, FT, RL, GA, l1-sparse) and metrics.

Quick use from Python::

    from salun_diffusers.classification import ExperimentConfig, run_experiment
    results = run_experiment(ExperimentConfig(dataset="mnist", scenario="class", seeds=[0]))
    print(results["markdown"])

or one method on your own model and data with :func:`unlearn`. The command line is ``salun-classifier``.
"""

from .data import ImageData, load_dataset, make_forget_split  # noqa: F401
from .experiment import ExperimentConfig, run_experiment, write_results  # noqa: F401
from .methods import METHODS, MethodConfig, UnlearnResult, salun_mask, train_classifier, unlearn  # noqa: F401
from .metrics import average_gap, evaluate_unlearning, mia_efficacy  # noqa: F401
from .models import ResNet18, SmallCNN, build_model  # noqa: F401

__all__ = ["ImageData", "load_dataset", "make_forget_split", "ExperimentConfig", "run_experiment", "write_results",
           "METHODS", "MethodConfig", "UnlearnResult", "salun_mask", "train_classifier", "unlearn", "average_gap",
           "evaluate_unlearning", "mia_efficacy", "ResNet18", "SmallCNN", "build_model"]
