"""MLflow "models from code" definition for an msprior nn~ export (logged by msprior/registry.py).

MLflow copies this file next to the model; it carries the `.ts` as the artifact "ts", unpickled
and untouched, so `msprior pull` returns the exact bytes that nn~ loads. It never imports msprior:
`mlflow.pyfunc.load_model(...)` needs only torch. `predict` runs one nn~ `forward` call:
input [B, in_ch, T] (or [in_ch, T]) values per RAVE frame -> [B, Q + 1, T].
"""

import mlflow
from mlflow.pyfunc import PythonModel


class NNTildeExport(PythonModel):
    def load_context(self, context):
        import torch

        self.model = torch.jit.load(context.artifacts["ts"], map_location="cpu").eval()

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if x.dim() == 2:
            x = x.unsqueeze(0)
        with torch.inference_mode():
            return self.model(x).numpy()


mlflow.models.set_model(NNTildeExport())
