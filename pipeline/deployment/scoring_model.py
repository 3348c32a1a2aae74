"""The scoring model as MLflow's "models from code": the file that a logged scoring model stores
instead of a pickle of the model object.

``pipeline.deployment.serving.log_scoring_model`` passes this file's path as ``python_model``;
MLflow copies it into the logged model and runs it when the model is loaded (``mlflow models
serve``, ``mlflow.pyfunc.load_model``), and it hands over a fresh ``ScoringModel``, whose
``load_context`` reads the model file with ``weights_only=True``. Nothing of the model is
unpickled, and ``kgi serve`` checks this file's digest (and every other file's) before serving.
"""

import mlflow

from pipeline.deployment.serving import ScoringModel

mlflow.models.set_model(ScoringModel())
