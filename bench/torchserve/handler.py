"""PEER, NOT CNNSERVE: the TorchServe handler `cnnserve bench` uses for its TorchServe comparison.

A custom handler as TorchServe's docs suggest for a model its built-in image handlers
do not fit (they assume 3-channel ImageNet normalisation): each image of the batch is
decoded with Pillow, converted to the model's channels and resized; the TorchScript
model (the cnnserve Classifier, normalisation inside) runs on the uint8 batch.
"""

import io

import numpy as np
import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler


class CnnHandler(BaseHandler):
    def initialize(self, context):
        super().initialize(context)
        extra = context.model_yaml_config.get("handler", {}) if context.model_yaml_config else {}
        self.channels, self.height, self.width = extra.get("input_shape", [1, 28, 28])
        self.labels = extra.get("labels", [])

    def preprocess(self, data):
        images = []
        for row in data:
            raw = row.get("data") or row.get("body")
            img = Image.open(io.BytesIO(raw)).convert("L" if self.channels == 1 else "RGB")
            a = np.asarray(img.resize((self.width, self.height)), dtype=np.uint8)
            images.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        return torch.from_numpy(np.stack(images))

    def inference(self, data, *args, **kwargs):
        with torch.inference_mode():
            return torch.softmax(self.model(data), dim=1)

    def postprocess(self, data):
        top = torch.topk(data, k=min(5, data.shape[1]), dim=1)
        return [[{"label": self.labels[i] if self.labels else str(i), "probability": float(p)}
                 for p, i in zip(ps.tolist(), ix.tolist())] for ps, ix in zip(top.values, top.indices)]
